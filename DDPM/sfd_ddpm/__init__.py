"""Class-conditional pixel diffusion and score-based unlearning (SFD, SiD, baselines).

Modules, one idea each:
  diffusion    - the VP schedule and the one denoiser interface every loss and sampler uses (VP or EDM)
  networks     - the class-conditional eps-prediction UNet (diffusers UNet2DModel)
  samplers     - ancestral DDPM, DDIM and the one-step generator, with per-seed noise streams
  data         - CIFAR-10, STL-10, MNIST and the built-in procedural dataset; remain/forget splits
  config       - YAML configs with a typed schema, command-line overrides
  checkpoints  - safetensors weights with their config, training states, atomic writes
  distributed  - one process or torchrun (NCCL on CUDA, gloo on CPU)
  training     - the generic loop: run directory, logging, snapshots, resume
  losses       - the fake-score DSM loss and the SiD generator loss
  methods/     - pretraining, SFD/SiD (and later baselines), each a small class
  classifiers  - dataset classifiers (ResNet-34, a small CNN for the built-in dataset)
  metrics/     - unlearning accuracy, FID/IS/precision/recall/KID, PUL
"""
