"""Real-size run on this machine: a ViT-L/14-336-shaped CLIP (or, with --family siglip, a SigLIP SO400M-14-384)
through `upcycle sparse` and the LLaVA tower.

The base has openai/clip-vit-large-patch14-336's exact CLIPConfig (--family siglip: google/siglip-so400m-patch14-384's
SiglipConfig, the shape of open_clip's ViT-SO400M-14-SigLIP-384; both written out below; nothing is downloaded) with
random weights, saved as a transformers directory in a temporary folder. Then:

  build_base        the random dense CLIP written with save_pretrained (set-up; not part of the target)
  upcycle_sparse    python -m upcycle sparse --num-experts 4 --top-k 2 --moe-layers all --towers vision,text
                    (streaming writer + the layer-wise dense-vs-MoE check it prints)
  upcycle_in_memory (only with --baseline) the previous path: CLIPModel.from_pretrained, sparse_upcycle,
                    max_output_diff on both models, save_clip_moe; its model.safetensors is compared with
                    the streamed one by SHA-256
  tower             CLIPMoEVisionTower (select layer -2, patch features) load + one forward per batch size
                    of 336x336 (SigLIP: 384x384) images
  roundtrip         the MoE model's from_pretrained -> save_pretrained -> from_pretrained (AutoModel), the
                    re-saved weights compared with the streamed file by SHA-256
--upcycle-only stops after upcycle_sparse (the step whose memory the target is about).

Every step runs in its own subprocess; its peak RSS is that child's ru_maxrss from os.wait4 (the kernel's
high-water mark of resident memory of exactly that process), its wall time is measured around it.
Prints one JSON object on stdout (progress on stderr); --out FILE also writes it atomically.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# openai/clip-vit-large-patch14-336 config.json, the fields that shape the model.
VIT_L14_336 = {
    "projection_dim": 768,
    "logit_scale_init_value": 2.6592,
    "text_config": {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1, "projection_dim": 768,
    },
    "vision_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
        "patch_size": 14, "image_size": 336, "num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
        "projection_dim": 768,
    },
}
# google/siglip-so400m-patch14-384 config.json (transformers' SiglipConfig defaults fill the rest: gelu_pytorch_tanh,
# layer_norm_eps 1e-6, a 32000-token vocabulary, 64 text positions): width 1152, MLP 4304, 27 layers, 16 heads.
SO400M_14_384 = {
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16},
    "vision_config": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                      "num_attention_heads": 16, "patch_size": 14, "image_size": 384},
}
SMOKE_SIGLIP = {
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "vocab_size": 1000, "max_position_embeddings": 16},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 14, "image_size": 56},
}
UPCYCLE_ARGS = ["--num-experts", "4", "--top-k", "2", "--moe-layers", "all", "--towers", "vision,text"]
# --smoke: the same steps on a small model, to check this script in seconds (its numbers mean nothing).
SMOKE = {
    "projection_dim": 32,
    "text_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "vocab_size": 1000, "max_position_embeddings": 32, "hidden_act": "quick_gelu",
                    "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 0},
    "vision_config": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
                      "patch_size": 14, "image_size": 56, "hidden_act": "quick_gelu"},
}
TARGET_RATIO = 1.5  # peak RSS of the upcycling step over the output size

BUILD_BASE = """
import json, sys, torch
from transformers import CLIPConfig, CLIPModel, SiglipConfig, SiglipModel
from encoder.convert.dense import default_processor_for
config_class, model_class = (SiglipConfig, SiglipModel) if sys.argv[3] == "siglip" else (CLIPConfig, CLIPModel)
config = config_class(**json.loads(sys.argv[2]))
torch.manual_seed(0)
model = model_class(config).eval()
model.save_pretrained(sys.argv[1])
default_processor_for(config).save_pretrained(sys.argv[1])
print(json.dumps({"parameters": sum(p.numel() for p in model.parameters())}))
"""

IN_MEMORY = """
import json, sys
from encoder.convert.dense import load_dense_clip
from encoder.utils.files import save_clip_moe
from upcycle import sparse_upcycle
from upcycle.eval.function_check import max_output_diff
dense = load_dense_clip(sys.argv[1])
model = sparse_upcycle(dense.model, 4, 2, "all", ("vision", "text"), 0)
diff = max_output_diff(dense.model, model)
save_clip_moe(model, sys.argv[2], dense.image_processor, dense.tokenizer, {"base": sys.argv[1]})
print(json.dumps({"max_abs_diff": max(diff.values())}))
"""

TOWER = """
import json, sys, time, types, torch
from encoder import CLIPMoEVisionTower
t0 = time.perf_counter()
args = types.SimpleNamespace(mm_vision_select_layer=-2, mm_vision_select_feature="patch")
tower = CLIPMoEVisionTower(sys.argv[1], args)
result = {"load_s": round(time.perf_counter() - t0, 2), "dtype": str(tower.dtype), "forward": []}
g = torch.Generator().manual_seed(0)
for batch in json.loads(sys.argv[2]):
    size = tower.config.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    t0 = time.perf_counter()
    with torch.no_grad():
        features = tower(images)
    result["forward"].append({"batch": batch, "seconds": round(time.perf_counter() - t0, 2),
                              "features_shape": list(features.shape),
                              "finite": bool(torch.isfinite(features).all())})
print(json.dumps(result))
"""

ROUNDTRIP = """
import json, sys, time
from transformers import AutoModel
import encoder  # registers every family's MoE classes with AutoModel
from encoder.utils.files import file_sha256
t0 = time.perf_counter()
model = AutoModel.from_pretrained(sys.argv[1])
t1 = time.perf_counter()
model.save_pretrained(sys.argv[2])
t2 = time.perf_counter()
del model
again = AutoModel.from_pretrained(sys.argv[2])
t3 = time.perf_counter()
same = file_sha256(sys.argv[1] + "/model.safetensors") == file_sha256(sys.argv[2] + "/model.safetensors")
print(json.dumps({"from_pretrained_s": round(t1 - t0, 2), "save_pretrained_s": round(t2 - t1, 2),
                  "reload_s": round(t3 - t2, 2), "resaved_weights_identical": same,
                  "parameters": sum(p.numel() for p in again.parameters())}))
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_step(name: str, argv: list[str], work: Path) -> dict:
    """Run argv as a child process; wall time, its own peak RSS (os.wait4), exit code and its last stdout line."""
    log(f"[{name}] running ...")
    stdout_path, stderr_path = work / f"{name}.stdout", work / f"{name}.stderr"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    with open(stdout_path, "w") as out, open(stderr_path, "w") as err:
        start = time.perf_counter()
        child = subprocess.Popen(argv, stdout=out, stderr=err, cwd=ROOT, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    stdout = stdout_path.read_text()
    result = {"wall_s": round(wall, 1), "peak_rss_bytes": usage.ru_maxrss * 1024, "exit_code": child.returncode}
    if child.returncode != 0:
        tail = stderr_path.read_text().strip().splitlines()[-5:]
        raise SystemExit(f"step {name} failed (exit {child.returncode}): " + " | ".join(tail))
    result["stdout"] = stdout
    log(f"[{name}] {wall:.1f} s, peak RSS {usage.ru_maxrss / 2**20:.2f} GiB")
    return result


def python_step(name: str, code: str, args: list[str], work: Path) -> dict:
    result = run_step(name, [sys.executable, "-c", textwrap.dedent(code), *args], work)
    result.update(json.loads(result.pop("stdout").strip().splitlines()[-1]))
    return result


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    try:
        mem = int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    except (OSError, AttributeError):
        mem = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "memory_bytes": mem,
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "gpu": "none (CPU run)", "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=__doc__.split("\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the JSON to this file (atomically)")
    parser.add_argument("--work-dir", help="where the base and the CLIP-MoE are written (default: a new temporary "
                        "directory, removed at the end); needs ~12 GB of disk, ~17 GB with --baseline")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument("--batch-sizes", default="1,4", help="tower forward batch sizes (default 1,4)")
    parser.add_argument("--baseline", action="store_true",
                        help="also run the previous in-memory upcycling (~12 GB peak) and compare its weights")
    parser.add_argument("--smoke", action="store_true", help="a small model instead (checks the script in seconds)")
    parser.add_argument("--family", choices=("clip", "siglip"), default="clip",
                        help="clip: the ViT-L/14-336 CLIP (default); siglip: the SigLIP SO400M-14-384")
    parser.add_argument("--upcycle-only", action="store_true", help="stop after upcycle_sparse (no tower, no "
                        "roundtrip: half the disk and time)")
    args = parser.parse_args(argv)
    siglip = args.family == "siglip"
    model_config = (SMOKE_SIGLIP if siglip else SMOKE) if args.smoke else (SO400M_14_384 if siglip else VIT_L14_336)
    batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-real-size-"))
    work.mkdir(parents=True, exist_ok=True)
    base = work / ("siglip-so400m-patch14-384-random" if siglip else "clip-vit-large-patch14-336-random")
    moe = work / ("siglip-moe" if siglip else "clip-moe")
    for path in (base, moe, work / "clip-moe-in-memory", work / "clip-moe-resaved"):
        shutil.rmtree(path, ignore_errors=True)
    steps = {}
    load_at_start = round(os.getloadavg()[0], 2)
    try:
        steps["build_base"] = python_step("build_base", BUILD_BASE, [str(base), json.dumps(model_config),
                                                                     args.family], work)
        base_bytes = dir_bytes(base)
        step = run_step("upcycle_sparse", [sys.executable, "-m", "upcycle", "sparse", "--base", str(base),
                                           "--out", str(moe), *UPCYCLE_ARGS], work)
        printed = step.pop("stdout")
        check = re.search(r"dense-vs-MoE check: max abs diff (\S+)", printed)
        step["dense_vs_moe_max_abs_diff"] = float(check.group(1)) if check else None
        step["summary"] = [line.strip() for line in printed.splitlines() if "parameters:" in line or "tower:" in line]
        steps["upcycle_sparse"] = step
        output_bytes = dir_bytes(moe)
        if args.baseline and not args.upcycle_only:
            old = work / "clip-moe-in-memory"
            steps["upcycle_in_memory"] = python_step("upcycle_in_memory", IN_MEMORY, [str(base), str(old)], work)
            from encoder.utils.files import file_sha256

            steps["upcycle_in_memory"]["weights_identical_to_streamed"] = (
                file_sha256(old / "model.safetensors") == file_sha256(moe / "model.safetensors"))
            shutil.rmtree(old, ignore_errors=True)
        if not args.upcycle_only:
            steps["tower"] = python_step("tower", TOWER, [str(moe), json.dumps(batches)], work)
            steps["roundtrip"] = python_step("roundtrip", ROUNDTRIP, [str(moe), str(work / "clip-moe-resaved")],
                                             work)
    finally:
        if not args.keep and not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    for step in steps.values():
        step["peak_rss_over_output"] = round(step["peak_rss_bytes"] / output_bytes, 3)
    ratio = steps["upcycle_sparse"]["peak_rss_over_output"]
    report = {
        "benchmark": "real-size sparse upcycling + LLaVA tower on CPU (scripts/bench_real_size.py)",
        "machine": {**machine(), "load_average_1min_at_start": load_at_start},
        "base": {"shape": "smoke-test model" if args.smoke else
                 f"{'google/siglip-so400m-patch14-384' if siglip else 'openai/clip-vit-large-patch14-336'} config, "
                 "random weights (seed 0)", "family": args.family, "config": model_config,
                 "parameters": steps["build_base"]["parameters"], "bytes": base_bytes},
        "upcycle_args": UPCYCLE_ARGS,
        "output_bytes": output_bytes,
        "measurement": "each step in its own subprocess; peak_rss_bytes = that child's ru_maxrss (os.wait4); "
                       "wall_s around the child, imports included",
        "target": {"peak_rss_over_output_max": TARGET_RATIO, "upcycle_sparse": ratio, "met": ratio <= TARGET_RATIO},
        "steps": steps,
    }
    text = json.dumps(report, indent=2) + "\n"
    print(text, end="")
    if args.out:
        from encoder.utils.files import write_atomic

        write_atomic(args.out, lambda tmp: tmp.write_text(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
