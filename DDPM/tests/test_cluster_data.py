"""The cluster path: torchrun on EDM networks with NVIDIA's augmentation input, one download for all
ranks, clear messages offline, and how folder images are read (flips, bit depth, oversized files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from conftest import torchrun

# A tiny SongUNet with NVIDIA's 9-dimensional augmentation-label input (as in the public CIFAR-10 EDM networks).
TINY_EDM_AUG = ["data.builtin_per_class=8", "data.num_workers=0", "model.base_channels=8", "model.channel_mult=[1,2]",
                "model.attn_resolutions=[8]", "model.augment_dim=9", "training.batch_size=4", "training.n_iters=2",
                "training.log_every=1", "training.snapshot_every=2", "training.state_every=2", "grid.steps=2",
                "grid.per_class=1"]


@pytest.mark.slow  # ~1 min: two 2-rank runs
@pytest.mark.subprocess
def test_edm_with_augment_input_trains_under_torchrun(tmp_path):
    """DDP needs every parameter in the graph: the unused augment input crashed iteration 2 (issue 21)."""
    torchrun("train.py", "--config", "configs/builtin_edm_train.yaml", "--outdir", tmp_path / "teacher", *TINY_EDM_AUG,
             "--device", "cpu")
    (teacher,) = (tmp_path / "teacher").iterdir()
    ckpt = teacher / "network-0000002.safetensors"
    assert ckpt.exists()
    torchrun("train.py", "--config", "configs/builtin_edm_sfd.yaml", "--outdir", tmp_path / "sfd", f"sfd.init={ckpt}",
             *TINY_EDM_AUG, "--device", "cpu")
    (run,) = (tmp_path / "sfd").iterdir()
    assert (run / "network-0000002.safetensors").exists()


def test_augment_input_takes_part_in_the_graph_and_changes_nothing():
    """Zeros through map_augment: the same output, bit for bit, as skipping it; every parameter gets a grad."""
    import copy

    import torch

    from sfd_ddpm import config as C
    from sfd_ddpm.networks import build_network
    torch.manual_seed(0)
    cfg = C.load_config(None, ["model.arch=songunet", "model.base_channels=8", "model.channel_mult=[1,2]",
                               "model.layers_per_block=1", "model.attn_resolutions=[8]", "model.dropout=0.0",
                               "data.image_size=16", "model.augment_dim=9"])
    net = build_network(cfg)
    without = copy.deepcopy(net)
    without.model.map_augment = None  # what the network computed before (the input skipped)
    x, sigma, label = torch.randn(3, 3, 16, 16), torch.tensor([0.02, 1.0, 60.0]), torch.tensor([0, 4, 10])
    out = net(x, sigma, label)
    assert torch.equal(out, without(x, sigma, label))
    out.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert torch.count_nonzero(net.model.map_augment.weight.grad) == 0  # Adam leaves it where it was


def asymmetric_folder(root: Path, classes=("a", "b"), per_class: int = 10, size: int = 8) -> Path:
    """Class folders of images bright on the left and dark on the right: a flip is visible in every one."""
    import numpy as np
    from PIL import Image

    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            img = np.zeros((size, size, 3), np.uint8)
            img[:, :size // 2] = 200 + 5 * c + i
            Image.fromarray(img).save(root / name / f"{i:02d}.png")
    return root


def _is_mirrored(x) -> "torch.Tensor":
    """Per image: is the right half brighter than the left (a flipped asymmetric image)?"""
    w = x.shape[-1] // 2
    return x[..., w:].mean(dim=(1, 2, 3)) > x[..., :w].mean(dim=(1, 2, 3))


@pytest.mark.parametrize("flip", [None, True])
def test_folder_teacher_sees_no_flipped_images_by_default(tmp_path, monkeypatch, flip):
    """data.random_flip=null on a folder: no batch of the training loop holds a mirrored image (issue 26)."""
    import torch

    from conftest import TINY
    from sfd_ddpm import config as C
    from sfd_ddpm.distributed import Dist
    from sfd_ddpm.methods import pretrain
    root = asymmetric_folder(tmp_path / "imgs")
    cfg = C.load_config("configs/builtin_train.yaml", [*TINY, "data.dataset=folder", f"data.root={root}",
                                                       "data.n_classes=2", "data.image_size=8",
                                                       f"data.random_flip={'null' if flip is None else 'true'}"])
    seen = []
    real_loss = pretrain.eps_loss
    monkeypatch.setattr(pretrain, "eps_loss", lambda d, x0, *a: seen.append(x0.clone()) or real_loss(d, x0, *a))
    method = pretrain.Pretrain(cfg, Dist())
    method.start(0)
    for step in range(4):
        method.train_step(step)
    mirrored = _is_mirrored(torch.cat(seen))
    assert len(mirrored) == 32
    if flip is None:
        assert method.cfg["data"]["random_flip"] is False  # recorded in config.json and the checkpoints
        assert not mirrored.any()
    else:
        assert method.cfg["data"]["random_flip"] is True and mirrored.any() and not mirrored.all()


def test_flip_default_keeps_the_authors_setting_on_cifar10():
    from sfd_ddpm import config as C
    from sfd_ddpm.data import with_flip_resolved
    assert C.load_config(None)["data"]["random_flip"] is None
    for dataset, flip in (("cifar10", True), ("stl10", True), ("builtin", True), ("folder", False), ("mnist", False)):
        assert with_flip_resolved(C.load_config(None, [f"data.dataset={dataset}"]))["data"]["random_flip"] is flip
    assert with_flip_resolved(C.load_config(None, ["data.dataset=folder", "data.random_flip=true"]))["data"]["random_flip"]
    for cfg in ("cifar10_train", "stl10_train", "cifar10_retrain", "stl10_retrain"):
        assert C.load_config(f"configs/{cfg}.yaml")["data"]["random_flip"] is True
    with pytest.raises(C.ConfigError, match="random_flip"):
        C.load_config(None, ["data.random_flip=yes please"])


def test_folder_classifier_is_trained_without_flips_by_default(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import train_classifier
    from sfd_ddpm import classifiers
    from sfd_ddpm.classifiers import read_classifier_metadata
    root = asymmetric_folder(tmp_path / "imgs")
    flips = []
    real = classifiers.random_hflip
    monkeypatch.setattr(classifiers, "random_hflip", lambda x, g: flips.append(len(x)) or real(x, g))
    for extra, expect in (([], False), (["--hflip"], True)):
        out = tmp_path / f"clf{len(extra)}.safetensors"
        res = CliRunner().invoke(train_classifier.main, ["--dataset", "folder", "--root", str(root), "--image-size", "8",
                                                         "--epochs", "1", "--out", str(out), "--no-progress", *extra])
        assert res.exit_code == 0, res.output
        assert read_classifier_metadata(out)["training"]["hflip"] is expect
        assert bool(flips) is expect


def _png(path: Path, width: int, height: int, depth: int, colour: int, rows: bytes = b"") -> Path:
    """A PNG written chunk by chunk (PIL writes no 16-bit colour PNGs and no header-only giants)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) +
                     chunk(b"IEND", b""))
    return path


def test_16_bit_pngs_are_read_at_their_depth(tmp_path):
    """A mid-grey 16-bit PNG (grey or colour) is mid-grey, not white (issue 26)."""
    import numpy as np
    from PIL import Image

    from sfd_ddpm.folder_data import _decode
    grey = np.full((8, 8), 0x8080, np.uint16)
    grey[:, 4:] = 0x2020
    Image.fromarray(grey).save(tmp_path / "grey16.png")  # PIL: mode I;16
    rgb = np.zeros((8, 8, 3), ">u2")
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 0x8080, 0x2020, 0xFFFF
    rows = b"".join(b"\x00" + rgb[y].tobytes() for y in range(8))  # filter byte 0 per row, big-endian samples
    _png(tmp_path / "rgb16.png", 8, 8, 16, 2, rows)
    a, why = _decode(str(tmp_path / "grey16.png"), 8)
    assert why == "" and (a[:, :4] == 0x80).all() and (a[:, 4:] == 0x20).all()
    a, why = _decode(str(tmp_path / "rgb16.png"), 8)
    assert why == "" and (a[..., 0] == 0x80).all() and (a[..., 1] == 0x20).all() and (a[..., 2] == 0xFF).all()


def test_decompression_bomb_in_a_class_folder_is_skipped_with_a_warning(tmp_path, capsys):
    """A PNG whose header claims 20000 x 20000 pixels: skipped and named, like an unreadable file."""
    from sfd_ddpm.data import load_dataset
    root = asymmetric_folder(tmp_path / "imgs", per_class=12)
    _png(root / "a" / "zz_bomb.png", 20000, 20000, 8, 0)  # 400 Mpx: over 2 x PIL's MAX_IMAGE_PIXELS
    n = len(load_dataset("folder", str(root), 8, "train")) + len(load_dataset("folder", str(root), 8, "test"))
    assert n == 24
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image file(s) of 25" in err and "zz_bomb.png: over PIL's decompression-bomb" in err


# ---------------------------------------------------------------------------------------------
# Downloads: a CIFAR-10 stand-in in torchvision's layout, served from 127.0.0.1


def cifar10_archive(folder: Path, per_class: int = 2) -> tuple[Path, str]:
    """A tiny cifar-10-python.tar.gz in torchvision's cifar-10-batches-py layout, and its md5."""
    import hashlib
    import pickle
    import tarfile

    import numpy as np
    rng = np.random.default_rng(0)
    inner = folder / "cifar-10-batches-py"
    inner.mkdir(parents=True)

    def batch(name, n):
        labels = [i % 10 for i in range(n)]
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8) // 32 * 32  # compresses: a small archive
        (inner / name).write_bytes(pickle.dumps({"data": data, "labels": labels, "batch_label": name}))
    for k in range(1, 6):
        batch(f"data_batch_{k}", 10 * per_class)
    batch("test_batch", 10)
    (inner / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    archive = folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(inner, arcname="cifar-10-batches-py")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture
def mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving the stand-in archive; ``requests`` lists every GET path."""
    import functools
    import http.server
    import threading

    served = tmp_path / "mirror"
    served.mkdir()
    archive, md5 = cifar10_archive(tmp_path / "build")
    archive.rename(served / archive.name)
    requests: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            try:
                super().do_GET()
            except (BrokenPipeError, ConnectionResetError):  # torchvision's redirect probe reads no body
                pass

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield {"url": f"http://127.0.0.1:{server.server_address[1]}/", "md5": md5, "requests": requests}
    server.shutdown()
    server.server_close()


def closed_port_url() -> str:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"  # nothing listens there any more: a refused connection, as offline


def test_mirror_download_checks_the_given_md5(tmp_path, mirror):
    from sfd_ddpm.data import load_dataset
    ds = load_dataset("cifar10", str(tmp_path / "data"), 16, "train", mirror=mirror["url"], mirror_md5=mirror["md5"])
    assert len(ds) == 100 and tuple(ds[0][0].shape) == (3, 16, 16)
    assert len(mirror["requests"]) > 0 and all(r.endswith("/cifar-10-python.tar.gz") for r in mirror["requests"])
    with pytest.raises(FileNotFoundError, match=r"could not be downloaded from .*cifar-10-python.tar.gz \(File not found or corrupted"):
        load_dataset("cifar10", str(tmp_path / "other"), 16, "train", mirror=mirror["url"], mirror_md5="0" * 32)
    with pytest.raises(FileNotFoundError, match="could not be downloaded"):  # torchvision's own sums, a stand-in
        load_dataset("cifar10", str(tmp_path / "third"), 16, "train", mirror=mirror["url"])


@pytest.mark.slow  # ~40 s: four ranks on two cores
@pytest.mark.subprocess
def test_four_ranks_on_an_empty_root_fetch_the_dataset_once(tmp_path, mirror):
    """Rank 0 alone downloads; the others wait and read its files (issue 21: 2 of 3 runs failed)."""
    from conftest import TINY
    from sfd_ddpm.data import load_dataset
    load_dataset("cifar10", str(tmp_path / "probe"), 16, "train", mirror=mirror["url"], mirror_md5=mirror["md5"])
    one_fetch = len(mirror["requests"])  # the GETs of one download (torchvision also asks for redirects)
    mirror["requests"].clear()
    root = tmp_path / "data"
    torchrun("train.py", "--config", "configs/builtin_train.yaml", "--outdir", tmp_path / "runs", *TINY,
             "data.dataset=cifar10", f"data.root={root}", f"data.mirror={mirror['url']}",
             f"data.mirror_md5={mirror['md5']}", "training.n_iters=2", "--device", "cpu", nproc=4)
    assert len(mirror["requests"]) == one_fetch
    (run,) = (tmp_path / "runs").iterdir()
    assert (run / "network-0000002.safetensors").exists()  # DDP steps need all four ranks


def _offline_message(result, name: str, root: Path) -> str:
    """The CLI ended with one line naming the dataset, where it looked and how to place it; no traceback."""
    assert result.exit_code not in (0, None) and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: ") and "Traceback" not in result.output, result.output
    message = lines[-1]
    assert f"{name} not found under {root.resolve()}" in message and "cifar-10-batches-py" in message
    return message


def test_train_offline_says_which_dataset_where_and_how(tmp_path):
    from click.testing import CliRunner

    import train
    from conftest import TINY
    root = tmp_path / "data"
    result = CliRunner().invoke(train.main, ["--config", "configs/builtin_train.yaml", "--outdir", str(tmp_path / "runs"),
                                             *TINY, "data.dataset=cifar10", f"data.root={root}",
                                             f"data.mirror={closed_port_url()}", "--device", "cpu"])
    message = _offline_message(result, "cifar10", root)
    assert "Connection refused" in message and not (tmp_path / "runs").exists() and not root.exists()


def test_offline_on_torchvisions_own_url(tmp_path, monkeypatch):
    """No mirror, no network: the message gives the dataset's home URL to fetch by hand."""
    import urllib.error
    import urllib.request

    from click.testing import CliRunner

    import save_dataset

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data"
    result = CliRunner().invoke(save_dataset.main, ["--dataset", "cifar10", "--root", str(root), "--out",
                                                    str(tmp_path / "refs")])
    message = _offline_message(result, "cifar10", root)
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in message
    assert "name resolution" in message and not (tmp_path / "refs").exists()
    result = CliRunner().invoke(save_dataset.main, ["--dataset", "cifar10", "--root", str(root), "--out",
                                                    str(tmp_path / "refs"), "--no-download"])
    assert "download is off" in _offline_message(result, "cifar10", root)


def test_train_classifier_offline_without_pretrained_weights(tmp_path):
    from click.testing import CliRunner

    import train_classifier
    root = tmp_path / "data"
    result = CliRunner().invoke(train_classifier.main, ["--dataset", "cifar10", "--no-pretrained", "--root", str(root),
                                                        "--mirror", closed_port_url(), "--out",
                                                        str(tmp_path / "clf.safetensors")])
    _offline_message(result, "cifar10", root)
    assert not (tmp_path / "clf.safetensors").exists()
