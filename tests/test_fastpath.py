"""Fast paths (hvd_pcdarts/fastpath/) against the eager reference: device-resident data with batched
augmentation (bit-identical batches), channels_last and batch norm as plain reductions (float64, to 1e-9),
flags of train_search.py. The CUDA-graph step needs a GPU: its test is skipped on the CPU, and
benchmarks/run_device.sh runs the same comparison on the GPU (benchmarks/RESULTS.md, "Equivalence on the GPU")."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from helpers import REPO_ROOT, describe, horovodrun_cmd, launch, python_exe
from search_runs import cuda_search_steps, rel_diff

from hvd_pcdarts import fastpath as fp
from hvd_pcdarts.data import DataBundle, SeededView, ShardSampler, _digits, _synthetic, make_loader, make_transform
from hvd_pcdarts.errors import UsageError
from hvd_pcdarts.experimental.composite_bn import CompositeBatchNorm2d, use_composite_bn
from hvd_pcdarts.space.ops import channel_shuffle
from hvd_pcdarts.steps import SearchStep, TrainStep

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SCRIPT = str(REPO_ROOT / "bin" / "train_search.py")


# --- device-resident data ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dataset,cutout,augment", [("cifar10", 0, True), ("cifar10", 16, True), ("digits", 0, True),
                                                    ("synthetic", 0, True), ("cifar10", 0, False)])
def test_device_loader_batches_equal_eager_loader(dataset, cutout, augment):
    bundle = _digits() if dataset == "digits" else _synthetic(32, 10, 300, 8, 1)
    tf = make_transform(bundle, True, augment, dataset, cutout=cutout)
    view = SeededView(bundle.train, range(7, 250), tf, seed=5, stream=1)
    view.set_epoch(3)
    sampler = ShardSampler(view, 2, 1, seed=5)
    sampler.set_epoch(3)
    spec = fp.augment_spec(bundle, True, augment, dataset, cutout=cutout)
    dev = fp.DeviceLoader(fp.DeviceImages(view, spec, torch.device("cpu")), 16, sampler)
    ref = make_loader(view, 16, sampler, workers=0, drop_last=True)
    assert len(dev) == len(ref) > 0
    n = 0
    for (x, y, i), (xr, yr, ir) in zip(dev, ref):
        assert torch.equal(i, ir) and torch.equal(y, yr)
        assert x.dtype == xr.dtype and x.shape == xr.shape
        assert torch.equal(x, xr), (x - xr).abs().max()
        n += 1
    assert n == len(ref)


def test_device_loader_batch_sampler_and_channels_last():
    bundle = _synthetic(32, 10, 100, 4, 2)
    tf = make_transform(bundle, True, True, "cifar10")
    view = SeededView(bundle.train, range(100), tf, seed=1)
    spec = fp.augment_spec(bundle, True, True, "cifar10")
    images = fp.DeviceImages(view, spec, torch.device("cpu"), channels_last=True)
    batches = [[3, 1, 4], [15, 9, 2]]
    out = list(fp.DeviceLoader(images, batch_sampler=batches))
    assert len(out) == 2
    for (x, y, idx), pos in zip(out, batches):
        assert x.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(x, torch.stack([view[p][0] for p in pos]))
        assert idx.tolist() == pos and y.tolist() == [view[p][1] for p in pos]


def test_draw_params_leave_global_rng_alone():
    spec = fp.AugmentSpec(mean=(0.5,), std=(0.5,), pad=4, flip=True, cutout=8)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    p = fp.draw_params(spec, [1, 2, 3], 32, 32)
    assert torch.equal(torch.get_rng_state(), before)
    assert p.shape == (3, 5) and int(p[:, :2].max()) <= 8 and set(p[:, 2].tolist()) <= {0, 1}


def test_gpu_data_refuses_image_files():
    bundle = DataBundle(None, None, 10, 224, (0.5,) * 3, (0.5,) * 3, "pil")
    with pytest.raises(UsageError, match="--gpu-data"):
        fp.augment_spec(bundle, True, True, "imagefolder")


# --- channels_last, composite batch norm ---------------------------------------------------------------------------
def test_channel_shuffle_channels_last_same_values():
    x = torch.randn(3, 16, 5, 7)
    a = channel_shuffle(x, 4)
    b = channel_shuffle(x.contiguous(memory_format=torch.channels_last), 4)
    assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
    c = channel_shuffle(x.contiguous(memory_format=torch.channels_last)[:, :8], 2)  # a non-contiguous slice
    assert torch.equal(c, channel_shuffle(x[:, :8].contiguous(), 2))


@pytest.mark.parametrize("affine", [False, True])
def test_composite_batchnorm_equals_batchnorm(affine):
    torch.manual_seed(0)
    ref = nn.Sequential(nn.BatchNorm2d(4, affine=affine)).double()
    new = use_composite_bn(nn.Sequential(nn.BatchNorm2d(4, affine=affine)).double())
    assert isinstance(new[0], CompositeBatchNorm2d)
    if affine:
        with torch.no_grad():
            ref[0].weight.uniform_(0.5, 1.5)
            ref[0].bias.uniform_(-1, 1)
    new.load_state_dict(ref.state_dict())
    for _ in range(3):
        x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa), new(xb)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.allclose(ya, yb, atol=1e-12) and torch.allclose(xa.grad, xb.grad, atol=1e-12)
    for (k, a), b in zip(ref.state_dict().items(), new.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), atol=1e-14), k
    ref.eval()
    new.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    assert torch.allclose(ref(x), new(x), atol=1e-12)


def _run_steps(variant: str, steps: int = 2):
    model, arch, weights, a_opt, w_opt = fp.build_search(8, 5, 4, seed=4, channels_last=variant == "cl")
    model.double()
    if variant == "bnc":
        use_composite_bn(model)
    step = SearchStep(model, nn.CrossEntropyLoss(), arch, weights, a_opt, w_opt, grad_clip=5.0,
                              channels_last=variant == "cl")
    g = torch.Generator().manual_seed(9)
    losses = []
    for _ in range(steps):
        xa, ya = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
        xw, yw = torch.randn(6, 3, 16, 16, generator=g, dtype=torch.float64), torch.randint(0, 10, (6,), generator=g)
        losses.append(float(step.arch_step(xa, ya)))
        losses.append(float(step.weight_step(xw, yw)[1]))
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def eager_run():
    return _run_steps("eager")


@pytest.mark.parametrize("variant", ["cl", "bnc"])
def test_fast_variant_search_steps_equal_eager_float64(variant, eager_run):
    l0, s0 = eager_run
    l1, s1 = _run_steps(variant)
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-10
    for k in s0:
        assert torch.allclose(s0[k].double(), s1[k].double(), rtol=1e-8, atol=1e-10), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_search_step_equals_eager_cuda(strict_fp32):
    (l0, p0, _), (l1, p1, _) = (cuda_search_steps(m) for m in ("eager", "graph"))
    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-4
    assert rel_diff(p0, p1) < 1e-4


# --- flags of train_search.py --------------------------------------------------------------------------------------
TINY = ["--dataset", "digits", "--init-channels", "8", "--layers", "3", "--workers", "0", "--no-tensorboard",
        "--no-progress", "--epochs", "1", "--arch-start-epoch", "0", "--batch-size", "32", "--steps-per-epoch", "2",
        "--eval-steps", "2", "--seed", "3"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_graph_without_gpu_is_one_line_usage_error(tmp_path):
    res = launch([python_exe(), SCRIPT, *TINY, "--cuda-graph", "--output-dir", tmp_path / "o"], timeout=120)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--cuda-graph needs a CUDA GPU" in lines[0], describe(res)


@pytest.mark.slow
def test_gpu_data_search_equals_loader_search(tmp_path):
    """--gpu-data (on the CPU here: the same code with device=cpu) gives the very same run: same batches."""
    out = {}
    for tag, extra in (("loader", []), ("gpu_data", ["--gpu-data"])):
        d = tmp_path / tag
        res = launch([python_exe(), SCRIPT, *TINY, *extra, "--device", "cpu", "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(out["loader"], out["gpu_data"]):
        assert a["train_loss"] == b["train_loss"] and a["valid_loss"] == b["valid_loss"]
        assert a["arch"] == b["arch"]


@pytest.mark.slow
def test_train_channels_last_runs_and_matches(tmp_path):
    """bin/train.py --channels-last: same run as without, to float32 rounding (drop path off: no randomness)."""
    train = str(REPO_ROOT / "bin" / "train.py")
    common = ["--genotype", "PCDARTS", "--dataset", "digits", "--init-channels", "8", "--layers", "3", "--epochs", "1",
              "--batch-size", "32", "--steps-per-epoch", "2", "--workers", "0", "--no-tensorboard", "--no-progress",
              "--drop-path-prob", "0", "--no-auxiliary", "--seed", "1", "--device", "cpu"]
    out = {}
    for tag, extra in (("ref", []), ("cl", ["--channels-last"])):
        res = launch([python_exe(), train, *common, *extra, "--output-dir", tmp_path / tag], timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = json.loads((tmp_path / tag / "metrics.jsonl").read_text().splitlines()[-1])
    assert abs(out["ref"]["train_loss"] - out["cl"]["train_loss"]) < 1e-3
    assert abs(out["ref"]["test_loss"] - out["cl"]["test_loss"]) < 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_train_search_bf16_cuda_graph_matches_eager_bf16_cuda(tmp_path):
    """--bf16 with --cuda-graph (the graphed steps autocast inside the graphs) against the eager --bf16 run."""
    out = {}
    for tag, extra in (("eager", []), ("graph", ["--cuda-graph", "--gpu-data", "--batched-edges"])):
        d = tmp_path / tag
        res = launch([python_exe(), SCRIPT, *TINY, "--bf16", *extra, "--device", "cuda", "--no-augment",
                      "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(out["eager"], out["graph"]):  # bf16 rounding, different kernels: a looser tolerance
        assert abs(a["train_loss"] - b["train_loss"]) < 2e-2 and abs(a["valid_loss"] - b["valid_loss"]) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_train_search_cuda_graph_matches_eager_cuda(tmp_path):
    """train_search.py --cuda-graph --gpu-data on a GPU: the same search as the eager path, to float32 rounding."""
    out = {}
    for tag, extra in (("eager", []), ("graph", ["--cuda-graph", "--gpu-data"])):
        d = tmp_path / tag
        res = launch([python_exe(), SCRIPT, *TINY, *extra, "--device", "cuda", "--no-augment", "--output-dir", d],
                     timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(out["eager"], out["graph"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-3 and abs(a["valid_loss"] - b["valid_loss"]) < 1e-3


# --- the retraining step and the flags of train.py -----------------------------------------------------------------
TRAIN = str(REPO_ROOT / "bin" / "train.py")
TRAIN_TINY = ["--genotype", "PCDARTS", "--dataset", "digits", "--init-channels", "8", "--layers", "3", "--epochs", "2",
              "--batch-size", "32", "--steps-per-epoch", "2", "--workers", "0", "--no-tensorboard", "--no-progress",
              "--cutout-length", "4", "--drop-path-prob", "0.2", "--lr", "0.1", "--seed", "1"]


def _final_weights(out_dir):
    return torch.load(out_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_train_cuda_graph_without_gpu_is_one_line_usage_error(tmp_path):
    res = launch([python_exe(), TRAIN, *TRAIN_TINY, "--cuda-graph", "--output-dir", tmp_path / "o"], timeout=120)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--cuda-graph needs a CUDA GPU" in lines[0], describe(res)
    assert not (tmp_path / "o").exists()


def test_train_gpu_data_refuses_image_folder(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c in range(2):
            d = tmp_path / "data" / split / f"c{c}"
            d.mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (16, 16), (60 * c + i, 0, 0)).save(d / f"{i}.png")
    res = launch([python_exe(), TRAIN, "--genotype", "PCDARTS", "--dataset", "imagefolder", "--data-dir",
                  tmp_path / "data", "--image-size", "16", "--batch-size", "2", "--epochs", "1", "--layers", "3",
                  "--init-channels", "4", "--workers", "0", "--no-tensorboard", "--device", "cpu", "--gpu-data",
                  "--output-dir", tmp_path / "o"], timeout=120)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--gpu-data needs a dataset held as tensors" in lines[0], describe(res)
    assert "Traceback" not in res.stderr


@pytest.mark.slow
def test_train_gpu_data_equals_loader_train(tmp_path):
    """bin/train.py --gpu-data (on the CPU here: the same code with device=cpu) gives the very same run, bit for
    bit: same batches (crops and cutouts included), same drop-path masks (2 epochs: drop path on in the second)."""
    out = {}
    for tag, extra in (("loader", []), ("gpu_data", ["--gpu-data"])):
        d = tmp_path / tag
        res = launch([python_exe(), TRAIN, *TRAIN_TINY, *extra, "--device", "cpu", "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = ([json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()], _final_weights(d))
    (m0, w0), (m1, w1) = out["loader"], out["gpu_data"]
    assert [r["drop_path_prob"] for r in m0] == [0.0, 0.1]
    for a, b in zip(m0, m1):
        assert a["train_loss"] == b["train_loss"] and a["test_loss"] == b["test_loss"]
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k]), k


def _tiny_eval_net(seed=0):
    from hvd_pcdarts.models import NetworkCIFAR

    torch.manual_seed(seed)
    return NetworkCIFAR(8, 10, 3, True, "PCDARTS").cuda()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graph_replay_draws_the_eager_drop_path_masks_cuda():
    """The assumption GraphedTrainStep's exactness rests on: after the same manual_seed, a replayed graph's
    bernoulli_ draws (drop_path's masks) equal the eager ones bit for bit, and a replay advances the generator
    as the eager calls do."""
    from hvd_pcdarts.space.ops import drop_path

    x = torch.ones(64, 4, 2, 2, device="cuda")

    def masks():
        return [drop_path(x, 0.3) for _ in range(3)]

    torch.manual_seed(11)
    eager = masks() + [torch.rand(5, device="cuda")]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        masks()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static = masks()
    torch.manual_seed(11)
    g.replay()
    replayed = [t.clone() for t in static] + [torch.rand(5, device="cuda")]
    for a, b in zip(eager, replayed):
        assert torch.equal(a, b)
    assert 0 < float(eager[0].count_nonzero()) < eager[0].numel()  # some samples dropped, some kept


def _train_steps(mode, seeds, probs):
    model = _tiny_eval_net()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    cls = fp.GraphedTrainStep if mode == "graph" else TrainStep
    step = cls(model, nn.CrossEntropyLoss(), list(model.parameters()), opt, grad_clip=5.0, aux_weight=0.4)
    g = torch.Generator().manual_seed(9)
    losses = []
    for s, prob in zip(seeds, probs):
        x, y = torch.randn(8, 3, 16, 16, generator=g).cuda(), torch.randint(0, 10, (8,), generator=g).cuda()
        model.drop_path_prob = prob
        torch.manual_seed(s)  # as train.py's _seed_step
        losses.append(float(step.step(x, y)[1]))
    return losses, [p.detach().clone() for p in model.parameters()], step


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_graphed_train_step_equals_eager_cuda(strict_fp32):
    """Auxiliary head, drop path (off, then 0.2, then 0.3: three captures), clipping: the graphed step computes the
    eager step to float32 rounding; other drop-path masks (other seeds) would show far above the tolerance."""
    seeds, probs = [1, 2, 3, 4, 5], [0.0, 0.2, 0.2, 0.3, 0.3]
    l0, p0, _ = _train_steps("eager", seeds, probs)
    l1, p1, graphed = _train_steps("graph", seeds, probs)
    l2, p2, _ = _train_steps("eager", [s + 100 for s in seeds], probs)
    assert graphed.captures == 3

    def rel(pa, pb):
        num = sum(float((a - b).double().pow(2).sum()) for a, b in zip(pa, pb)) ** 0.5
        return num / sum(float(a.double().pow(2).sum()) for a in pa) ** 0.5

    assert max(abs(a - b) for a, b in zip(l0, l1)) < 1e-4, (l0, l1)
    assert rel(p0, p1) < 1e-5
    assert max(abs(a - b) for a, b in zip(l0[1:], l2[1:])) > 1e-2 and rel(p0, p2) > 1e-4  # masks matter


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_train_cuda_graph_matches_eager_cuda(tmp_path):
    """bin/train.py --cuda-graph on a GPU: the same retraining as the eager path (auxiliary head, cutout, drop path
    on in epoch 2, recaptured). Both runs use cuDNN's deterministic algorithms (--deterministic): without them two
    eager runs alone differ by ~5e-3 in the epoch loss and 3e-3 in the weights (H100, torch 2.11: atomics,
    amplified by BN on the digits' near-constant channels). With them the graphed run was bit-identical to the
    eager one there; the tolerances (losses 1e-4, weights 1e-5 relative) leave room for other GPUs and versions
    and stay far below what other drop-path masks give (1e-2 in the loss)."""
    out = {}
    for tag, extra in (("eager", ["--deterministic"]), ("graph", ["--deterministic", "--cuda-graph"])):
        d = tmp_path / tag
        res = launch([python_exe(), TRAIN, *TRAIN_TINY, *extra, "--device", "cuda", "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = ([json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()], _final_weights(d))
    (m0, w0), (m1, w1) = out["eager"], out["graph"]
    assert len(m0) == len(m1) == 2
    for a, b in zip(m0, m1):
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 and abs(a["test_loss"] - b["test_loss"]) < 1e-4
    keys = [k for k in w0 if w0[k].is_floating_point()]
    num = sum(float((w0[k].double() - w1[k].double()).pow(2).sum()) for k in keys) ** 0.5
    den = sum(float(w0[k].double().pow(2).sum()) for k in keys) ** 0.5
    assert num / den < 1e-5, num / den


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dataset,cutout", [("cifar10", 16), ("digits", 4)])
def test_device_loader_batches_on_cuda_equal_eager_loader(dataset, cutout):
    """--gpu-data on a GPU: the batches augmented there equal the CPU loader's bit for bit (crop, flip, float
    conversion, normalization, cutout)."""
    bundle = _digits() if dataset == "digits" else _synthetic(32, 10, 300, 8, 1)
    tf = make_transform(bundle, True, True, dataset, cutout=cutout)
    view = SeededView(bundle.train, range(200), tf, seed=5, stream=0)
    view.set_epoch(2)
    sampler = ShardSampler(view, 1, 0, seed=5)
    sampler.set_epoch(2)
    spec = fp.augment_spec(bundle, True, True, dataset, cutout=cutout)
    dev = fp.DeviceLoader(fp.DeviceImages(view, spec, torch.device("cuda")), 32, sampler)
    ref = make_loader(view, 32, sampler, workers=0, drop_last=True)
    for (x, y, _), (xr, yr, _) in zip(dev, ref):
        assert x.is_cuda and torch.equal(y.cpu(), yr)
        assert torch.equal(x.cpu(), xr), (x.cpu() - xr).abs().max()


# --- train_search.py --bf16 ----------------------------------------------------------------------------------------
BF16_RUN = [*TINY[:TINY.index("--epochs")], "--epochs", "2", *TINY[TINY.index("--epochs") + 2:], "--no-augment",
            "--device", "cpu"]


@pytest.mark.slow
def test_train_search_bf16_runs_close_to_float32(tmp_path):
    """--bf16 (here on the CPU: the same autocast code): the forward passes run in bfloat16, so the losses differ
    from the float32 run, but only by bf16 rounding; weights, BN statistics and optimizer states stay float32."""
    out = {}
    for tag, extra in (("fp32", []), ("bf16", ["--bf16"]), ("bf16_be", ["--bf16", "--batched-edges"])):
        d = tmp_path / tag
        res = launch([python_exe(), SCRIPT, *BF16_RUN, *extra, "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        assert ("bf16 autocast" in res.stdout + res.stderr) == (tag != "fp32"), describe(res)
        ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
        assert all(t.dtype in (torch.float32, torch.int64) and (not t.is_floating_point() or torch.isfinite(t).all())
                   for t in ckpt["model"].values())
        out[tag] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    for tag in ("bf16", "bf16_be"):
        diffs = [abs(a[k] - b[k]) for a, b in zip(out["fp32"], out[tag]) for k in ("train_loss", "valid_loss")]
        assert len(diffs) == 4 and max(diffs) < 2e-2, (tag, diffs)
        assert max(diffs) > 0  # autocast was on: bf16 rounding shows


@pytest.mark.ranks
@pytest.mark.slow
def test_train_search_bf16_two_ranks_hold_identical_parameters(tmp_path):
    """2 real ranks with --bf16 and Horovod's per-tensor hooks: the float32 gradients of bf16 forwards average as
    usual; every rank ends with the same parameters."""
    res = launch(horovodrun_cmd(2, [SCRIPT, *BF16_RUN, "--bf16", "--batched-edges", "--grad-allreduce", "overlap",
                                    "--output-dir", tmp_path / "o"]), timeout=600)
    assert res.returncode == 0, describe(res)
    assert "all 2 rank(s) hold identical parameters" in res.stdout + res.stderr, describe(res)


@pytest.mark.parametrize("flags,msg", [(["--bf16", "--amp"], "--amp (float16 with loss scaling) and --bf16 exclude"),
                                       (["--bf16", "--fp64"], "--fp64 and --bf16 exclude each other")])
def test_bf16_with_amp_or_fp64_is_one_line_usage_error(tmp_path, flags, msg):
    res = launch([python_exe(), SCRIPT, *TINY, *flags, "--device", "cpu", "--output-dir", tmp_path / "o"],
                 timeout=120)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and msg in lines[0], describe(res)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


# --- train.py --bf16 -------------------------------------------------------------------------------------------------
TRAIN_RUN = ["--genotype", "PCDARTS", "--dataset", "digits", "--init-channels", "8", "--layers", "3", "--epochs", "2",
             "--batch-size", "32", "--steps-per-epoch", "3", "--workers", "0", "--no-tensorboard", "--no-progress",
             "--seed", "1", "--device", "cpu"]


@pytest.mark.slow
def test_train_bf16_runs_close_to_float32(tmp_path):
    """bin/train.py --bf16 (CPU autocast here; auxiliary head, drop path, evaluation under autocast too): close to
    the float32 run, not equal to it, float32 checkpoint."""
    train = str(REPO_ROOT / "bin" / "train.py")
    out = {}
    for tag, extra in (("fp32", []), ("bf16", ["--bf16"])):
        d = tmp_path / tag
        res = launch([python_exe(), train, *TRAIN_RUN, *extra, "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        assert ("bf16 autocast" in res.stdout + res.stderr) == (tag == "bf16"), describe(res)
        ckpt = torch.load(d / "checkpoint.pt", weights_only=True)
        assert all(t.dtype in (torch.float32, torch.int64) for t in ckpt["model"].values())
        out[tag] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    diffs = [abs(a[k] - b[k]) for a, b in zip(out["fp32"], out["bf16"]) for k in ("train_loss", "test_loss")]
    assert len(diffs) == 4 and 0 < max(diffs) < 5e-2, diffs


def test_train_bf16_with_amp_is_one_line_usage_error(tmp_path):
    res = launch([python_exe(), str(REPO_ROOT / "bin" / "train.py"), *TRAIN_RUN, "--bf16", "--amp",
                  "--output-dir", tmp_path / "o"], timeout=120)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "--amp (float16 with loss scaling) and --bf16 exclude" in lines[0], describe(res)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_train_bf16_cuda_graph_matches_eager_bf16_cuda(tmp_path):
    """train.py --bf16 --cuda-graph (autocast inside the captured step) against eager --bf16, drop path on."""
    train = str(REPO_ROOT / "bin" / "train.py")
    out = {}
    for tag, extra in (("eager", []), ("graph", ["--cuda-graph", "--gpu-data"])):
        d = tmp_path / tag
        args = [a if a != "cpu" else "cuda" for a in TRAIN_RUN]
        res = launch([python_exe(), train, *args, "--bf16", *extra, "--no-augment", "--output-dir", d], timeout=300)
        assert res.returncode == 0, describe(res)
        out[tag] = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(out["eager"], out["graph"]):
        assert abs(a["train_loss"] - b["train_loss"]) < 5e-2 and abs(a["test_loss"] - b["test_loss"]) < 5e-2


def test_pick_device_turns_on_cudnn_benchmark_on_gpus(monkeypatch):
    """Both scripts run cuDNN in benchmark mode on GPUs (as the original code and the GPU benchmarks do)."""
    import argparse

    from hvd_pcdarts import runtime

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    for dev in ("cpu", "cuda"):
        monkeypatch.setattr(runtime.dist, "setup_device", lambda want, dev=dev: torch.device(dev))
        got = runtime.pick_device(argparse.Namespace(device="auto", amp=False))
        assert got.type == dev and torch.backends.cudnn.benchmark == (dev == "cuda")


def test_cuda_graph_steps_need_a_warm_up_pass():
    """The first call builds and caches what the model needs (index tensors copied from the host, pack plans): it
    must be eager, outside the capture."""
    with pytest.raises(ValueError, match="warm-up passes: 0"):
        fp.GraphedSearchStep(nn.Linear(2, 2), None, [], [], None, None, warmup=0)
    with pytest.raises(ValueError, match="warm-up passes: 0"):
        fp.GraphedTrainStep(nn.Linear(2, 2), None, [], None, warmup=0)
