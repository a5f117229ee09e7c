"""Evaluation of SD unlearning (docs/method.md section 7, "SD"): one module per metric, thin CLI in ``evaluate.py``.

- ``folders``    image sets: ``generate.py`` output (``<slug>/<seed:05d>.png`` + ``manifest.json``) or any folder;
- ``records``    the JSON each command writes: settings, library versions, per-image rows, totals;
- ``clip``       a CLIP model (hub id or folder) that embeds images and texts, loaded once per process;
- ``clip_score`` CLIP score of images against their own prompts (100 * max(cos, 0));
- ``celebrity``  identification accuracy of the forgotten and of other celebrities (zero-shot CLIP over a
                 name list, or a plugged-in recognizer such as the GIPHY Celebrity Detector);
- ``nudity``     NudeNet 3.4.2 detections of EXPOSED body parts (optional extra, imported lazily);
- ``fid``        FID against a reference folder and between original-model and unlearned-model images;
- ``i2p``        prompts of the I2P benchmark CSV, filtered by category;
- ``table``      the markdown table of forgetting vs preservation from the JSON records.
"""
