"""The tests' tiny random SD models are the example's (``examples/tiny_sd.py``): one builder."""
from examples.tiny_sd import (WORDS, build_tiny_clip, build_tiny_sd, sid_lsg_pickle,  # noqa: F401
                              tiny_features, tiny_unet, write_tokenizer)
