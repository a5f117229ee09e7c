"""Score Forgetting Distillation for Stable Diffusion (SPEC section 3, "SD defaults").

One module per idea:

- ``models``      loading SD parts (hub id or local folder) and the generator's initial weights;
- ``denoiser``    the VP schedule, prompt encoding and the guided denoiser interface that the
                  teacher, fake score and generator all sit behind; the one-step generator;
- ``prompts``     prompt files, concept substitution, override pairing, keywords, negatives, dropout;
- ``terms``       which prompts reach generator, fake score and teacher in each of the four terms;
- ``losses``      fake-score DSM loss and SiD generator loss, NaN-sample dropping;
- ``training``    the alternating training loop;
- ``checkpoints`` atomic writes, generator snapshots (diffusers folders), exact-resume state;
- ``images``      decoding latents and saving grids/PNGs;
- ``distributed`` one process or torchrun, CPU (gloo) or CUDA (NCCL).
"""
