"""White-box attacks on unlearned generators: does the forgotten class come back under search?

An attacker who holds the weights of an unlearned model searches, by gradient, for inputs that make it
draw the forgotten class again, as judged by the evaluation classifier:

* :func:`noise_search`: optimise the input noise for the forget label (one-step generators: z;
  multi-step models: the initial noise of a short differentiable DDIM), with a Gaussian-prior penalty
  on its norm so the noise stays typical;
* :func:`embedding_search`: optimise a continuous class embedding in place of the forget label's row
  of the network's label-embedding table (started from the forget row, then from the mean row), which
  finds class knowledge that is still in the network but no longer reachable through the label.

Both report, per budget (gradient steps), the attack success rate (attacked samples the classifier
labels as the forget class) and the mean p(forget). Everything is written against the Denoiser and
sampler interfaces; :func:`run_attacks` runs the set used by ``evaluate.py attack`` and ``compare.py``.
"""
from .search import (ATTACKS, Sampling, default_sampling, embedding_override, embedding_search, label_embedding_table, noise_search,
                     render, run_attacks)

__all__ = ["ATTACKS", "Sampling", "default_sampling", "embedding_override", "embedding_search", "label_embedding_table", "noise_search",
           "render", "run_attacks"]
