"""Evaluation metrics (docs/method.md sections 6 and 7), one module each:

  folders  - image folders (``CCC_IIIII.png``) in batches, class filters, 8-bit quantisation
  ua       - unlearning accuracy over the forget-class images only, entropy, p(forget),
             per-class accuracy of the remaining classes
  fid      - FID, IS, KID, precision/recall in Inception (TF-ported FID weights) or classifier
             feature space (``classifier_fid``), reference features cached by content hash
  pul      - percentage of unlearning (VDU)
  record   - what every result JSON carries: settings, hashes, library versions
"""
