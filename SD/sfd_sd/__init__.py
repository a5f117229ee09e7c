"""Score Forgetting Distillation for Stable Diffusion (docs/method.md section 3, "SD defaults").

One module per idea:

- ``config``      the typed settings schema: defaults, YAML configs, KEY=VALUE overrides, checks;
- ``models``      loading SD parts (hub id or local folder) and the generator's initial weights;
- ``sid_lsg``     reading SiD-LSG generator pickles with a restricted unpickler, conversion to a folder;
- ``denoiser``    the VP schedule, prompt encoding and the guided denoiser interface that the
                  teacher, fake score and generator all sit behind; the one-step generator;
- ``prompts``     prompt files, concept substitution, override pairing, keywords, negatives, dropout;
- ``terms``       which prompts reach generator, fake score and teacher in each of the four terms;
- ``losses``      fake-score DSM loss and SiD generator loss, NaN-sample dropping;
- ``training``    the alternating training loop, in named steps (inputs, build, run dir, loop, outputs);
- ``lora``        LoRA mode (adapter=lora): adapters on fake score and generator, adapter files (peft);
- ``memory``      the computed GPU memory plan of full and LoRA mode;
- ``checkpoints`` atomic writes, generator snapshots (diffusers folders), exact-resume state, run lock;
- ``images``      decoding latents and saving grids/PNGs;
- ``distributed`` one process or torchrun, CPU (gloo) or CUDA (NCCL).
"""
