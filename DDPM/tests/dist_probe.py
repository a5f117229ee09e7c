"""Run under torchrun by the tests: does each rank draw its own noise and timesteps, with its share
of the global batch? Rank 0 writes what every rank drew to the JSON file given as argv[1]."""
import json
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
