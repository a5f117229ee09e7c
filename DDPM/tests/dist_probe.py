"""Run under torchrun by the tests: does each rank draw its own noise and timesteps, with its share
of the global batch? Rank 0 writes what every rank drew to the JSON file given as argv[1]."""
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as tdist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sfd_ddpm import config as C, distributed  # noqa: E402
from sfd_ddpm.methods import get_method  # noqa: E402
from sfd_ddpm.training import train  # noqa: E402

out, method_name, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
dist = distributed.init("cpu")
cfg = C.load_config("configs/builtin_train.yaml", [f"method={method_name}", *overrides])
method = get_method(method_name)(cfg, dist)
drawn = []
original = method.schedule.sample_t
method.schedule.sample_t = lambda n, lo, hi, device, generator=None: drawn.append(original(n, lo, hi, device)) or drawn[-1]
# every Gaussian draw of the training step (pretraining uses randn_like, SFD's terms randn)
real_randn_like, real_randn = torch.randn_like, torch.randn
noise = []
torch.randn_like = lambda *a, **k: noise.append(real_randn_like(*a, **k)) or noise[-1]
torch.randn = lambda *a, **k: noise.append(real_randn(*a, **k)) or noise[-1]
train(method, cfg, None, dist)
mine = {"rank": dist.rank, "t": torch.cat(drawn).tolist(), "batch": int(drawn[0].shape[0]),
        "noise": [n.flatten()[:64].tolist() for n in noise]}
everyone = [None] * dist.world_size
tdist.all_gather_object(everyone, mine)
if dist.is_main:
    Path(out).write_text(json.dumps(everyone))
torch.randn_like, torch.randn = real_randn_like, real_randn
tdist.barrier()  # no rank tears the gloo group down while another still uses it
distributed.shutdown()
# Leave without running C++ static destructors: on 2 cores about one run in four aborted at interpreter
# exit ("terminate called without an active exception", a gloo/ATen worker thread still joinable), after
# the probe's work was done and written. The product's entry scripts are not affected by this exit path.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
