"""Turn a digit-grid data set into an lmms-eval task folder: the shipped task YAML next to a self-contained data file.

`upcycle make-digit-grids` writes LLaVA instruction JSON (one record per image, one question per grid position)
with image paths relative to its folder. lmms-eval wants one document per question and a dataset it can load
offline; a parquet file with the images embedded is both, and it stays valid wherever the folder is moved (the
YAML names it relative to itself, which lmms-eval resolves for local data files).
"""

from __future__ import annotations

import contextlib
import json
from importlib import resources
from pathlib import Path

from encoder.utils.constants import IMAGE_TOKEN
from encoder.utils.errors import UserError
from encoder.utils.files import atomic_output_dir

# The task YAML and its functions stay in the product's lmms/tasks/, not here: saved task folders (this command's
# output) name them by absolute module path, `!function mllm_bridge.lmms.tasks.digit_grids.utils...`, so moving
# them would break every folder already written. The YAML is copied unchanged.
TASK_PACKAGE = "mllm_bridge.lmms.tasks.digit_grids"
DATA_FILE = "digit_grids.parquet"  # the name the shipped YAML files give in dataset_kwargs.data_files
TASK_NAMES = ("digit_grids_qa", "digit_grids_mc")


def qa_documents(data_dir: str | Path, split: str = "test") -> list[dict]:
    """One document per question of `data_dir/{split}_qa.json`: id, grid_id, image (path), question, answer."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}_qa.json"
    if not path.is_file():
        raise UserError(f"{data_dir} has no {path.name}; write the data with `python -m upcycle make-digit-grids "
                        f"--out {data_dir}` (or pick another --split)")
    try:
        records = json.loads(path.read_text())
    except ValueError as err:
        raise UserError(f"{path} is not valid JSON ({err}); regenerate it") from None
    docs = []
    for record in records:
        turns = record.get("conversations", [])
        for q, (question, answer) in enumerate(zip(turns[0::2], turns[1::2])):
            if question.get("from") != "human" or answer.get("from") != "gpt":
                raise UserError(f"{path}: record {record.get('id')} does not alternate human/gpt turns")
            docs.append({
                "id": f"{record['id']}_q{q}",
                "grid_id": record["id"],
                "image": str(data_dir / record["image"]),
                "question": question["value"].replace(IMAGE_TOKEN, "").strip(),
                "answer": answer["value"].strip(),
            })
    if not docs:
        raise UserError(f"{path} holds no questions; regenerate it with --num-{split} 1 or more")
    return docs


def make_lmms_task(data_dir: str | Path, out: str | Path, split: str = "test", overwrite: bool = False) -> int:
    """Write the digit-grid task folder `out` (task YAML files + digit_grids.parquet) atomically; returns the
    number of documents (questions)."""
    from datasets import Dataset, Features, Image, Value

    docs = qa_documents(data_dir, split)
    missing = sorted({d["image"] for d in docs if not Path(d["image"]).is_file()})
    if missing:
        raise UserError(f"{len(missing)} images of {data_dir} are missing (e.g. {missing[0]}); regenerate the data")
    features = Features({"id": Value("string"), "grid_id": Value("string"), "image": Image(),
                         "question": Value("string"), "answer": Value("string")})
    columns = {name: [d[name] for d in docs] for name in features}
    columns["image"] = [{"bytes": Path(p).read_bytes(), "path": None} for p in columns["image"]]  # embedded
    with atomic_output_dir(out, overwrite) as tmp, _no_progress_bars():
        Dataset.from_dict(columns, features=features).to_parquet(str(tmp / DATA_FILE))
        for item in resources.files(TASK_PACKAGE).iterdir():
            if item.name.endswith(".yaml"):
                (tmp / item.name).write_text(item.read_text())
        (tmp / "README.md").write_text(_readme(data_dir, Path(out).resolve(), split, len(docs)))
    return len(docs)


@contextlib.contextmanager
def _no_progress_bars():
    """datasets draws a bar for a sub-second parquet write; the command prints its own one-line summary."""
    import datasets

    was_disabled = datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            datasets.enable_progress_bars()


def _readme(data_dir, out: Path, split: str, count: int) -> str:
    return (f"# lmms-eval digit-grid tasks\n\n{count} questions from the {split} split of `{data_dir}`, images "
            f"embedded in `{DATA_FILE}`.\n\n    python -m lmms_eval --include_path {out} "
            f"--tasks {','.join(TASK_NAMES)} --model llava_clipmoe --model_args pretrained=CHECKPOINT\n\n"
            "- `digit_grids_qa`: generated one-word answers, exact match\n"
            "- `digit_grids_mc`: likelihood of each digit 0-9, accuracy\n")


def run_make_lmms_task(args) -> int:
    """`python -m mllm_bridge make-lmms-task`."""
    count = make_lmms_task(args.data, args.out, args.split, args.overwrite)
    print(f"{count} questions written to {args.out}; evaluate with "
          f"`python -m lmms_eval --include_path {args.out} --tasks {','.join(TASK_NAMES)} ...`")
    return 0
