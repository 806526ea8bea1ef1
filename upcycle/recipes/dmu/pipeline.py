"""Diversified Multiplet Upcycling: MCL stages -> one FFN set per stage -> CLIP-MoE -> router training.

Any family's dense base: a SigLIP base is encoded, clustered and trained as SigLIP is (its pooled image and text
embeddings for the k-means, fixed-length unmasked captions, the sigmoid loss with its logit bias, frozen with the
rest of the non-FFN weights in the stages and with everything but the routers in router training).

Everything a run produces lives in a work directory with a manifest, so an interrupted run continues where it
stopped: finished stages are skipped, an unfinished stage keeps its clusters and resumes from its last
checkpoint. A stage's output is its FFN weights only (everything else is the base's, by construction).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.torch import load_file, save_file
from torch.utils.data import Subset

from encoder.convert.dense import load_dense_clip
from encoder.family import family_of
from encoder.loading import require_finite_weights
from encoder.save import save_clip_moe
from encoder.training import process_state
from encoder.utils.errors import UserError
from encoder.utils.files import check_output_dir, write_atomic
from encoder.utils.step_record import SettingsChanged, differences

from ...data import ImageTextDataset, model_tokenizer_fn, processor_transform, read_pairs, uses_sigmoid_loss
from ...train import ContrastiveTrainer
from ...train.params import is_trainable
from ..assemble import assemble_clip_moe, moe_config_for
from .clustering import DROPPED, accumulate_labels, describe, kmeans_labels, plan_batches
from .config import DMUConfig, default_work_dir, jsonable, recorded_settings
from .diagnostics import repeated_stages, shown, successive_nmi, summary_lines, update_similarity

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
class DMURun:
    """One DMU run bound to its work directory."""

    def __init__(self, cfg: DMUConfig, resume: bool = False):
        self.cfg = cfg
        self.work = Path(cfg.work_dir) if cfg.work_dir else default_work_dir(cfg.out)
        check_output_dir(cfg.out, cfg.overwrite)
        self.manifest = self._open_manifest(resume)
        dense = load_dense_clip(cfg.base)
        if dense.tokenizer is None:
            raise UserError(f"base {cfg.base} has no tokenizer files; save its tokenizer into the directory")
        self.base, self.image_processor, self.tokenizer = dense.model, dense.image_processor, dense.tokenizer
        self.base_source = dense.source
        # Before stage 1 encodes the data with it: a NaN weight would surface as a k-means or divergence error.
        require_finite_weights(self.base, f"base {cfg.base}")
        self.pairs = read_pairs(cfg.train_data, cfg.image_root, cfg.skip_missing)
        self.sigmoid = uses_sigmoid_loss(self.base.config)  # the base family's loss, in the stages and router training
        self.dataset = ImageTextDataset(self.pairs, processor_transform(self.image_processor),
                                        model_tokenizer_fn(self.tokenizer, self.base.config))
        if len(self.pairs) < cfg.batch_size:
            raise UserError(f"{len(self.pairs)} training pairs but the global batch is {cfg.batch_size}; "
                            "lower --batch-size or add data")
        self.moe_config = moe_config_for(self.base, cfg.num_experts, cfg.top_k, cfg.moe_layers, cfg.towers,
                                         aux_loss_coef=cfg.aux_loss_coef, router_z_loss_coef=cfg.z_loss_coef)

    # -- bookkeeping -------------------------------------------------------------------------------------
    def _open_manifest(self, resume: bool) -> dict:
        path = self.work / MANIFEST
        fresh = {"settings": self.cfg.fingerprint(), "stages": {}, "router": None}
        if not path.exists():
            return fresh
        if not resume:
            raise UserError(f"work directory {self.work} holds an earlier DMU run; pass --resume to continue it "
                            "or remove the directory")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise UserError(f"{path} is unreadable ({err}); remove {self.work} to start afresh") from None
        changed = differences(recorded_settings(manifest), fresh["settings"])
        if changed:
            raise SettingsChanged(f"--resume with other settings than {self.work} was made with ({'; '.join(changed)}); "
                                  "use the original settings or a new --work-dir")
        return manifest

    def _save_manifest(self) -> None:
        if not _is_main():
            return
        self.work.mkdir(parents=True, exist_ok=True)
        _write_json(self.work / MANIFEST, self.manifest)

    def stage_dir(self, stage: int) -> Path:
        return self.work / f"stage-{stage}"

    # -- the algorithm -----------------------------------------------------------------------------------
    def run(self) -> Path:
        labels = batches = np.zeros(len(self.pairs), dtype=np.int64)  # before stage 1: one cluster
        for stage in range(1, self.cfg.num_experts):
            labels, batches = self.run_stage(stage, labels, batches)
        self.diagnose()
        model = self.train_routers()
        self.save(model)
        return Path(self.cfg.out)

    def stage_model(self, stage: int):
        """The dense CLIP of `stage`: the base with that stage's FFNs (stage 0 = the base)."""
        model = copy.deepcopy(self.base)
        if stage > 0:
            model.load_state_dict(load_file(str(self.stage_dir(stage) / "ffn.safetensors")), strict=False)
        return model.eval()

    def run_stage(self, stage: int, previous: np.ndarray,
                  previous_batches: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Cluster (unless done before), train and save stage `stage`; returns its accumulated labels and the
        batch labels it trained on (`DROPPED` for pairs it left out)."""
        cfg, folder = self.cfg, self.stage_dir(stage)
        if self.manifest["stages"].get(str(stage), {}).get("status") == "done":
            logger.info("stage %d already finished; skipped", stage)
            return np.load(folder / "labels.npy"), np.load(folder / "batch_labels.npy")
        start = time.time()
        if not (folder / "clusters.json").exists():
            self.cluster(stage, previous, previous_batches)
        labels, batch_labels = np.load(folder / "labels.npy"), np.load(folder / "batch_labels.npy")
        report = json.loads((folder / "clusters.json").read_text())
        self.manifest["stages"][str(stage)] = {"status": "clustered", "clusters": report}
        self._save_manifest()
        kept = np.flatnonzero(batch_labels != DROPPED)
        if len(kept) == 0:
            raise UserError(f"stage {stage}: every cluster is smaller than the global batch {cfg.batch_size}, so "
                            "--small-clusters drop leaves nothing to train; use merge or bin or a smaller "
                            f"--batch-size, with a new --work-dir or after removing {self.work}")
        # `drop` trains on the kept pairs only; the other rules keep every pair (the sampler sees the same data)
        data = self.dataset if len(kept) == len(batch_labels) else Subset(self.dataset, kept.tolist())

        model = copy.deepcopy(self.base)  # every stage starts from the base; only its batches differ
        train_cfg = cfg.train_config("ffn", f"MCL stage {stage}", self.sigmoid)
        trainer = ContrastiveTrainer(model, data, self.dataset.collate, train_cfg, folder / "train",
                                     labels=batch_labels[kept], source=f"base {cfg.base}")
        model = trainer.train(resume=True)
        if _is_main():
            named = dict(model.named_parameters())
            _save_tensors(folder / "ffn.safetensors", {k: named[k].detach().cpu().contiguous()
                                                       for k in trainer.trainable})
        _wait()
        report.update(pairs_used_per_epoch=len(kept) - trainer.sampler.dropped_per_epoch,
                      steps=trainer.total_steps, pairs_seen=trainer.pairs_seen,
                      final_loss=_last_loss(folder / "train" / "metrics.jsonl"), seconds=round(time.time() - start, 1))
        self.manifest["stages"][str(stage)] = {"status": "done", "clusters": report}
        self._save_manifest()
        if _is_main():
            print(f"stage {stage}: {describe(report)}, {report['pairs_used_per_epoch']} of {len(self.pairs)} "
                  f"pairs per epoch, final loss {report['final_loss']:.4f}")
        return labels, batch_labels

    def cluster(self, stage: int, previous: np.ndarray, previous_batches: np.ndarray) -> None:
        """Encode with stage s-1's model (each process a share), k-means each modality on the main process,
        accumulate the labels and apply --small-clusters to the clusters below one global batch (`previous`,
        `previous_batches`: the labels and batch labels before this stage); results go to the stage folder."""
        from ...eval.embedding import encode_pairs

        state, folder = process_state(), self.stage_dir(stage)
        folder.mkdir(parents=True, exist_ok=True)
        share = self.pairs[state.process_index::state.num_processes]
        images, texts = encode_pairs(self.stage_model(stage - 1), share, self.image_processor, self.tokenizer,
                                     batch_size=max(self.cfg.batch_size, 64), device=state.device,
                                     desc=f"encoding for stage {stage}")
        _save_npy(folder / f"embeddings-rank{state.process_index}.npy",
                  np.concatenate([images.numpy(), texts.numpy()], axis=1))
        _wait()
        if state.is_main_process:
            parts = [np.load(folder / f"embeddings-rank{r}.npy") for r in range(state.num_processes)]
            both = np.empty((len(self.pairs), parts[0].shape[1]), dtype=np.float32)
            for r, part in enumerate(parts):
                both[r::state.num_processes] = part
            k, dim, seed = self.cfg.clusters_per_modality, images.shape[1], self.cfg.seed * 1000 + stage
            labels = accumulate_labels(previous, kmeans_labels(both[:, :dim], k, seed),
                                       kmeans_labels(both[:, dim:], k, seed + 500), k)
            batch_labels, rule = plan_batches(self.cfg.small_clusters, labels, previous, previous_batches, both,
                                              self.cfg.batch_size)
            _save_npy(folder / "labels.npy", labels)
            _save_npy(folder / "batch_labels.npy", batch_labels)
            for r in range(state.num_processes):
                (folder / f"embeddings-rank{r}.npy").unlink()
            _write_json(folder / "clusters.json", {"pairs": len(labels), **asdict(rule)})
        _wait()

    def diagnose(self) -> None:
        """How different the stages came out (see diagnostics.py): NMI of successive stages' batch labels and
        cosines of the stages' FFN updates; printed, and kept in the manifest and the model card."""
        if not _is_main():
            return
        stages = range(1, self.cfg.num_experts)
        batches = {s: np.load(self.stage_dir(s) / "batch_labels.npy") for s in stages}
        ffns = {s: load_file(str(self.stage_dir(s) / "ffn.safetensors")) for s in stages}
        updates = update_similarity(self.base.state_dict(), ffns)
        self.manifest["diagnostics"] = {"batch_label_nmi": successive_nmi(batches),
                                        "update_cosine": updates["cosine"], "update_norm": updates["norm"]}
        self._save_manifest()
        clusters = {s: st["clusters"] for s, st in self.manifest["stages"].items()}
        print("\n".join(summary_lines(clusters, self.manifest["diagnostics"])))
        for pair in repeated_stages(self.manifest["diagnostics"]["batch_label_nmi"]):
            logger.warning("stages %s batched the data identically (NMI 1): the later stage's expert learns what the "
                           "earlier one did; use a smaller --batch-size, fewer --clusters-per-modality or "
                           "--small-clusters merge", pair)

    def assemble(self):
        """Expert i of every MoE layer = stage i's FFN (expert 0 = the base's); routers new."""
        sources = [self.base.state_dict()] + [load_file(str(self.stage_dir(s) / "ffn.safetensors"))
                                              for s in range(1, self.cfg.num_experts)]
        return assemble_clip_moe(self.base, self.moe_config, sources, seed=self.cfg.seed)

    def train_routers(self):
        cfg = self.cfg
        model = self.assemble()
        start = time.time()
        train_cfg = cfg.train_config("router", "router training", self.sigmoid)
        trainer = ContrastiveTrainer(model, self.dataset, self.dataset.collate, train_cfg, self.work / "router",
                                     source=f"the {family_of(model.config).label} assembled from the base and the "
                                     "stages' FFNs",
                                     lr_flag="--router-lr")
        model = trainer.train(resume=True)
        self.manifest["router"] = {"status": "done", "steps": trainer.total_steps, "pairs_seen": trainer.pairs_seen,
                                   "final_loss": _last_loss(self.work / "router" / "metrics.jsonl"),
                                   "seconds": round(time.time() - start, 1)}
        self._save_manifest()
        return model

    def save(self, model) -> None:
        if not _is_main():
            return
        cfg = self.cfg
        card = {
            "base": self.base_source,
            "recipe": (f"Diversified Multiplet Upcycling: {cfg.num_experts - 1} MCL stages (FFNs only, from the "
                       f"base, {cfg.clusters_per_modality}x{cfg.clusters_per_modality} clusters per stage), "
                       f"expert 0 = the base, top-{cfg.top_k}; routers trained at lr {cfg.router_lr}"),
            "metrics": self._card_metrics(),
            "details": {"settings": self.cfg.fingerprint(), "stages": self.manifest["stages"],
                        "diagnostics": self.manifest.get("diagnostics"), "router": self.manifest["router"],
                        "train_pairs": len(self.pairs)},
        }
        save_clip_moe(model, cfg.out, self.image_processor, self.tokenizer, card, overwrite=cfg.overwrite)
        print(f"{family_of(model.config).label} written to {cfg.out} (work directory {self.work})")

    def _card_metrics(self) -> dict:
        """Per stage its final loss and clusters, then the diagnostics (what the card's metric lines show)."""
        metrics = {}
        for s, st in sorted(self.manifest["stages"].items(), key=lambda kv: int(kv[0])):
            metrics[f"stage {s} final loss"] = f"{st['clusters']['final_loss']:.4f}"
            metrics[f"stage {s} clusters"] = describe(st["clusters"])
        diagnostics = self.manifest.get("diagnostics") or {}
        for name, key in (("batch-label NMI", "batch_label_nmi"), ("FFN update cosine", "update_cosine")):
            for pair, value in diagnostics.get(key, {}).items():
                metrics[f"stages {pair} {name}"] = shown(value)
        return metrics


def run_dmu(cfg: DMUConfig, resume: bool = False) -> Path:
    return DMURun(cfg, resume).run()


def stage_ffn(base, work_dir: str | Path, stage: int) -> dict:
    """The FFN weights of stage `stage` of the DMU run in `work_dir` (stage 0: the base's own), keyed as in
    `base.state_dict()`: what expert `stage` of the assembled CLIP-MoE is made of.

    Raises UserError when the stage's file is missing or does not hold exactly the base's FFN parameters, with
    their shapes (a work directory made from another base).
    """
    state = base.state_dict()
    own = {k: v for k, v in state.items() if is_trainable(k, "ffn")}
    if stage == 0:
        return {k: v.detach().clone() for k, v in own.items()}
    path = Path(work_dir) / f"stage-{stage}" / "ffn.safetensors"
    if not path.is_file():
        raise UserError(f"{path} not found: stage {stage} of the DMU run in {work_dir} has not finished; "
                        "finish the run (upcycle dmu --resume) or pass the work directory the CLIP-MoE was made in")
    ffn = load_file(str(path))
    if set(ffn) != set(own) or any(ffn[k].shape != own[k].shape for k in own):
        odd = sorted(set(ffn) ^ set(own)) or [k for k in own if ffn[k].shape != own[k].shape]
        raise UserError(f"{path} does not hold the base's FFN parameters ({len(ffn)} tensors, the base has "
                        f"{len(own)} FFN tensors; first difference {odd[0]}): was the run made from another base?")
    return ffn


def dense_with_ffn(base, ffn: dict):
    """A copy of `base` (eval mode) whose FFN parameters are `ffn` (every one of them, e.g. from `stage_ffn`)."""
    model = copy.deepcopy(base)
    missing, unexpected = model.load_state_dict(ffn, strict=False)
    left = [k for k in missing if is_trainable(k, "ffn")]
    if unexpected or left:
        raise UserError(f"FFN weights do not fit the base: unexpected {unexpected[:3]}, missing {left[:3]}")
    return model.eval()


def _is_main() -> bool:
    return process_state().is_main_process


def _wait() -> None:
    process_state().wait_for_everyone()


def _write_json(path: Path, data) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1, default=jsonable) + "\n"))


def _save_tensors(path: Path, tensors: dict) -> None:
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp)))


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append .npy to the temporary name
            np.save(f, array)

    write_atomic(path, write)


def _last_loss(metrics: Path, window: int = 10) -> float:
    if not metrics.exists():
        return float("nan")
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    tail = [r["contrastive"] for r in rows[-window:]]
    return float(np.mean(tail)) if tail else float("nan")
