"""Standard evaluation with EleutherAI's lm-evaluation-harness, on local task definitions only.

Tasks are plain YAML files (lm-eval's task format, without `!function` tags) whose
`dataset_kwargs.data_files` name local JSON/JSONL files relative to the YAML; they are read here,
their data paths resolved, and handed to `lm_eval.simple_evaluate` as configs. The model is lm-eval's
own `hf` model on a Hugging Face folder (our export), loaded the way users load it
(`trust_remote_code=True`), with the logits of padded vocabulary ids (embedding rows past the
tokenizer) at -inf, so that no score gives them probability mass. Nothing is fetched from a hub: the offline switches are set before lm-eval
and datasets are imported. teleflm/eval/tasks/ ships two tasks built from the embedded sample.
"""

import os
from pathlib import Path

SHIPPED_TASKS = Path(__file__).with_name("tasks")


def task_configs(include: list[str | Path] = ()) -> dict[str, dict]:
    """Task name -> config of every YAML in the shipped folder and in `include` folders (later
    folders override earlier ones), with data_files made absolute."""
    import yaml

    configs = {}
    for folder in [SHIPPED_TASKS, *map(Path, include)]:
        if not folder.is_dir():
            raise FileNotFoundError(f"task folder {folder} does not exist")
        for path in sorted(folder.glob("*.yaml")):
            try:
                config = yaml.safe_load(path.read_text())
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: not plain YAML ({e})") from None
            if not isinstance(config, dict) or "task" not in config:
                raise ValueError(f"{path}: not a task (no 'task' key)")
            files = config.get("dataset_kwargs", {}).get("data_files", {})
            for split, name in files.items():
                resolved = (path.parent / name).resolve()
                if not resolved.is_file():
                    raise FileNotFoundError(f"{path}: data_files {split}: {resolved} does not exist")
                files[split] = str(resolved)
            configs[config["task"]] = config
    return configs


def task_items(tasks: list[str], include: list[str | Path] = ()) -> dict[str, list[str]]:
    """The scored text of every evaluation document of lm-evaluation-harness tasks, by task name, read
    offline from their local definitions (teleflm/eval/tasks/ and `include` folders, as `teleflm eval
    harness` reads them): the task's decontamination query if it has one, else the prompt, the target
    delimiter and the gold answer (what teleflm.data.decontaminate matches training text against)."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    available = task_configs(include)
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ValueError(
            f"--decontaminate-tasks: unknown task(s) {unknown}; local tasks: {sorted(available)}"
        )
    try:
        from lm_eval.api.task import ConfigurableTask
    except ImportError:
        raise ValueError(
            "--decontaminate-tasks needs lm-evaluation-harness: pip install -c constraints.txt 'teleflm[eval]'"
        ) from None
    out = {}
    for name in tasks:
        task = ConfigurableTask(config=available[name])
        items = out[name] = []
        for doc in task.eval_docs:
            if task.config.should_decontaminate:
                items.append(str(task.doc_to_decontamination_query(doc)))
                continue
            target = task.doc_to_target(doc)
            if task.OUTPUT_TYPE == "multiple_choice" and isinstance(target, int):
                target = task.doc_to_choice(doc)[target]
            elif isinstance(target, list):  # several gold answers: the first
                target = target[0] if target else ""
            items.append(f"{task.doc_to_text(doc)}{task.config.target_delimiter}{target}")
    return out


def masked_export(model_dir: str | Path, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) of an export, the model's logits at padded vocabulary ids set to -inf."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, trust_remote_code=True, dtype=getattr(torch, dtype)
    ).to(device)
    real = len(tokenizer)
    if real < model.config.vocab_size:

        def mask_padded(module, args, output):
            output.logits[..., real:] = -torch.inf
            return output

        model.register_forward_hook(mask_padded)
    return model.eval(), tokenizer


def run_harness(
    model_dir: str | Path,
    tasks: list[str],
    include: list[str | Path] = (),
    limit: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str = "float32",
) -> dict:
    """Scores per task: {task: {"acc": ..., "acc_stderr": ..., "acc_norm": ..., "n": items,
    "chance": ...}} from lm-eval's results."""
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import lm_eval
    except ImportError:
        raise ValueError(
            "lm-evaluation-harness is not installed: pip install -c constraints.txt 'teleflm[eval]'"
        ) from None

    available = task_configs(include)
    unknown = [t for t in tasks if t not in available]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; local tasks: {sorted(available)}")
    if not Path(model_dir, "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir}: not a Hugging Face folder (the harness needs an export: `teleflm export`)"
        )
    from lm_eval.models.huggingface import HFLM

    model, tokenizer = masked_export(model_dir, dtype, device)
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
        tasks=[available[t] for t in tasks],
        limit=limit,
        log_samples=False,
        bootstrap_iters=1000,
    )
    scores = {}
    for task in tasks:
        metrics = results["results"][task]
        scores[task] = {
            name.split(",")[0]: value
            for name, value in metrics.items()
            if "," in name and isinstance(value, float)
        }
        scores[task]["n"] = results["n-samples"][task]["effective"]
        scores[task]["chance"] = available[task].get("metadata", {}).get("chance")
    return scores
