"""Training-step time and peak memory of ResNet + objective: CE vs NCMI (and focal, SupCon), one run.

Default (GPU goal): ResNet-50, batch 256, 224², bf16 autocast, channels_last, SGD step included;
prints ms/step, peak CUDA memory and the ratios to CE. Goal: NCMI/CE <= 1.02 (paper Table IV:
6:39 vs 6:44 per ImageNet epoch). On CPU use a reduced setting, e.g.

    python bench/natural_step.py --model resnet18 --batch 32 --size 64 --classes 100 --device cpu

Inputs are random tensors (this measures the step, not the data pipeline). All objectives are
timed interleaved (round-robin over repeats) so drifting machine load hits every one equally.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from wsi_ncmi.losses import create_loss
from wsi_ncmi.natural.backbones import create_backbone


def build(objective: str, args: argparse.Namespace, device: torch.device):
    backbone, dim = create_backbone(args.model, cifar_stem=args.cifar_stem)
    backbone = backbone.to(device, memory_format=torch.channels_last)
    params = list(backbone.parameters())
    head = proj = None
    if objective == "ncmi":
        loss = create_loss("ncmi", num_classes=args.classes, embed_dim=dim).to(device)
        groups = [{"params": params}, {"params": [loss.xi], "lr": 1.0}]
    elif objective == "supcon":
        loss = create_loss("supcon", temperature=0.1).to(device)
        proj = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.ReLU(), torch.nn.Linear(dim, 128)).to(device)
        head = torch.nn.Linear(dim, args.classes).to(device)
        groups = [{"params": params + list(proj.parameters()) + list(head.parameters())}]
    else:
        loss = create_loss(objective).to(device)
        head = torch.nn.Linear(dim, args.classes).to(device)
        groups = [{"params": params + list(head.parameters())}]
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-5)
    return backbone, head, proj, loss, opt


def step_fn(objective: str, parts, x: torch.Tensor, y: torch.Tensor, amp: bool, device: torch.device):
    backbone, head, proj, loss, opt = parts

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            if objective == "supcon":  # two views: the batch is split into B/2 images × 2 views
                f = backbone(x)  # [B, D]
                z = proj(f).view(x.shape[0] // 2, 2, -1)
                out = loss(z.float(), y[: x.shape[0] // 2])["loss"]
                out = out + F.cross_entropy(head(f.detach()), y)
            elif objective == "ncmi":
                out = loss(backbone(x), y)["loss"]
            else:
                out = loss(head(backbone(x)), y)["loss"]
        out.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--cifar-stem", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-amp", action="store_true", help="fp32 instead of bf16 autocast")
    p.add_argument("--objectives", nargs="+", default=["ce", "ncmi", "focal", "supcon"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp = not args.no_amp and device.type == "cuda"
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    steps, peaks = {}, {}
    for obj in args.objectives:
        parts = build(obj, args, device)
        steps[obj] = (parts, step_fn(obj, parts, x, y, amp, device))
    times: dict[str, list[float]] = {o: [] for o in args.objectives}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for obj, (_, step) in steps.items():  # warm-up (and peak memory, measured per objective)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step()
        sync()
        peaks[obj] = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    for _ in range(args.repeats):
        for obj, (_, step) in steps.items():
            sync()
            t0 = time.perf_counter()
            step()
            sync()
            times[obj].append(time.perf_counter() - t0)
    print(
        f"model={args.model} batch={args.batch} size={args.size} classes={args.classes} device={device} "
        f"amp_bf16={amp} channels_last=True torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    base = statistics.median(times["ce"]) if "ce" in times else None
    print(f"{'objective':<10} {'median ms':>10} {'min ms':>8} {'peak MiB':>9} {'/CE':>6}")
    for obj, ts in times.items():
        med = statistics.median(ts)
        ratio = f"{med / base:.3f}" if base else "-"
        print(f"{obj:<10} {1e3 * med:10.1f} {1e3 * min(ts):8.1f} {peaks[obj]:9.0f} {ratio:>6}")


if __name__ == "__main__":
    main()
