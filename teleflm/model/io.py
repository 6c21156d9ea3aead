"""Checkpoint I/O: export a model as a Hugging Face folder; load our exports and the official layout.

An export is what plain `transformers` loads with `trust_remote_code=True` (the card's quick start):
config.json with `auto_map`, the two self-contained model files, safetensors weights (sharded past
`max_shard_size`, with an index), tokenizer files and generation_config.json.

Loading never runs code found in the folder: config.json is read as JSON into our own TeleFLMConfig,
weights come from safetensors or from pickles opened with `weights_only=True`, and the tokenizer class
is picked here from the files present, never from the folder's `auto_map`.
"""

import copy
import json
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from teleflm.config import read_json
from teleflm.data.tokenizer import add_chat_template, has_tokenizer, load_tokenizer, padded_ids
from teleflm.model.configuration_teleflm import TeleFLMConfig
from teleflm.model.modeling_teleflm import TeleFLMForCausalLM

CONFIG_NAME = "config.json"
GENERATION_CONFIG_NAME = "generation_config.json"
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
PICKLE_WEIGHTS, PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
MODEL_SOURCES = ("configuration_teleflm.py", "modeling_teleflm.py")
AUTO_MAP = {
    "AutoConfig": "configuration_teleflm.TeleFLMConfig",
    "AutoModel": "modeling_teleflm.TeleFLMModel",
    "AutoModelForCausalLM": "modeling_teleflm.TeleFLMForCausalLM",
}
# The transformers releases an export's model files work with: from the oldest checked by
# scripts/compat.sh (older ones lack the generic `prepare_inputs_for_generation` that remote code relies
# on) to the newest, which CI checks on every run.
OLDEST_TRANSFORMERS = "4.46.3"
EXPORT_README = """# {name}

A Tele-FLM model exported by teleflm: Llama's architecture and weight names with muP's multipliers
(`use_mup`, `input_mult`, `output_mult`, `mup_scale_factor` in config.json), so it loads with
`trust_remote_code=True` from the model files beside this one.

Works with transformers >= {oldest} (4.x and 5.x, where the KV cache argument was renamed) and
torch >= 2.5; teleflm is not needed. The model card's quick start:

```python
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
tokenizer = AutoTokenizer.from_pretrained("{name}", trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained("{name}", torch_dtype=torch.bfloat16, low_cpu_mem_usage=True,
                                             device_map="auto", trust_remote_code=True)
inputs = tokenizer("Beijing is the capital of China.", return_tensors="pt").to(model.device)
generated = model.generate(**inputs, max_new_tokens=128, repetition_penalty=1.03)
print(tokenizer.decode(generated.cpu()[0], skip_special_tokens=True))
```

Context: {context} positions. Vocabulary: {vocab} embedding rows.
"""
# The config fields of the released checkpoints (docs/model.md), which exports always write.
OFFICIAL_CONFIG_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "pretraining_tp",
    "tie_word_embeddings",
    "rope_theta",
    "rope_scaling",
    "attention_bias",
    "attention_dropout",
    "use_mup",
    "mup_scale_factor",
    "output_mult",
    "input_mult",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)
# Buffers that older Llama code saved along with the weights; we recompute them from the config.
IGNORED_TENSORS = re.compile(r"rotary_emb\.inv_freq$")
DTYPES = {
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp32": torch.float32,
    "float32": torch.float32,
}


class CheckpointError(ValueError):
    """A model folder that cannot be loaded or written as asked; the message names the culprit."""


def as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r} (use one of {', '.join(DTYPES)})")
    return DTYPES[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def new_token_budget(prompt_tokens: int, max_new_tokens: int, context: int) -> int:
    """How many tokens may follow a prompt: `max_new_tokens`, or fewer where the model's `context`
    (max_position_embeddings) ends first; past it a model computes garbage. An empty prompt, or one
    that leaves no position, is refused."""
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty (no tokens): there is nothing to continue")
    if prompt_tokens >= context:
        raise ValueError(
            f"the prompt takes {prompt_tokens} tokens; the model's context is {context} tokens, "
            "so nothing can follow it"
        )
    return min(max_new_tokens, context - prompt_tokens)


def check_tokenizer_fits(tokenizer, config: TeleFLMConfig, where: str | Path) -> None:
    if len(tokenizer) > config.vocab_size:
        raise CheckpointError(
            f"{where}: the tokenizer has {len(tokenizer)} entries, more than the model's vocab_size "
            f"({config.vocab_size})"
        )


# ----- loading -----


def load_config(model_dir: str | Path) -> TeleFLMConfig:
    """config.json of a Tele-FLM folder, read as data into our TeleFLMConfig (which validates it)."""
    path = Path(model_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (is {model_dir} a model folder?)")
    fields = read_json(path, CheckpointError)
    if str(fields.get("model_type", "")).lower() != "teleflm":
        raise CheckpointError(f"{path}: model_type is {fields.get('model_type')!r}, expected 'TeleFLM'")
    try:
        return TeleFLMConfig.from_dict(fields)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from e


def weight_files(model_dir: str | Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of a folder and, when sharded, the index's map from tensor name to file."""
    model_dir = Path(model_dir)
    for index_name, single_name in ((SAFE_INDEX, SAFE_WEIGHTS), (PICKLE_INDEX, PICKLE_WEIGHTS)):
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a weight index (no 'weight_map')") from e
            shards = sorted(set(weight_map.values()))
            for shard in shards:
                if Path(shard).name != shard:  # an index must not reach outside its folder
                    raise CheckpointError(f"{index}: shard name {shard!r} is not a plain file name")
                if not (model_dir / shard).is_file():
                    raise CheckpointError(f"{index}: names shard {shard}, which is missing from {model_dir}")
            return [model_dir / shard for shard in shards], weight_map
        if (model_dir / single_name).is_file():
            return [model_dir / single_name], None
    raise FileNotFoundError(
        f"{model_dir}: no weights ({SAFE_WEIGHTS}, {SAFE_INDEX}, {PICKLE_WEIGHTS} or {PICKLE_INDEX})"
    )


def read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one weight file, on the CPU. Pickles are opened with `weights_only=True`, which
    refuses anything but tensors and plain containers; containers are refused here."""
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a valid safetensors file ({e})") from e
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = re.search(r"GLOBAL \S+ was not an allowed global|Unsupported[^\n]*", str(e))
        raise CheckpointError(
            f"{path}: refused to unpickle, it holds objects other than tensors"
            + (f" ({reason.group(0)})" if reason else "")
        ) from e
    except (RuntimeError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable PyTorch weight file ({e})") from e
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: holds a {type(tensors).__name__}, not a dict of tensors")
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor")
    return tensors


def load_weights(model: torch.nn.Module, model_dir: str | Path) -> None:
    """Copy a folder's weights into `model` (casting to its dtype), file by file, after checking
    every tensor's name and shape against the model. Nothing is left half-checked: a missing
    tensor is reported after all files are read."""
    files, weight_map = weight_files(model_dir)
    expected = model.state_dict()
    loaded = set()
    for path in files:
        for name, tensor in read_weight_file(path).items():
            if IGNORED_TENSORS.search(name):
                continue
            if name in loaded:
                raise CheckpointError(f"{path}: tensor {name!r} was already read from another file")
            if name not in expected:
                raise CheckpointError(
                    f"{path}: unexpected tensor {name!r} {tuple(tensor.shape)} (not a parameter of "
                    f"{type(model).__name__})"
                )
            if tensor.shape != expected[name].shape:
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, the config needs "
                    f"{tuple(expected[name].shape)}"
                )
            with torch.no_grad():
                expected[name].copy_(tensor)
            loaded.add(name)
    missing = [name for name in expected if name not in loaded]
    if missing:
        name = missing[0]
        where = (
            f"{Path(model_dir) / weight_map[name]} (the index lists it there)"
            if weight_map and name in weight_map
            else ", ".join(str(p) for p in files)
        )
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"missing tensor {name!r}{more}: not in {where}")


def load_pretrained(
    path: str | Path,
    dtype: torch.dtype | str | None = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[TeleFLMForCausalLM, object | None]:
    """Load a Tele-FLM folder (our export or the official layout) as (model in eval mode, tokenizer
    or None when the folder has none). `dtype=None` keeps the dtype config.json records (float32 when
    it records none); `device` defaults to cuda when available, else cpu."""
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    model_dir = Path(path)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: no such model folder")
    config = load_config(model_dir)
    tokenizer = load_tokenizer(model_dir) if has_tokenizer(model_dir) else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, config, model_dir)
    dtype = as_dtype(dtype) or as_dtype(config.dtype) or torch.float32
    device = torch.device(device) if device is not None else default_device()

    # Allocate directly in the target dtype and device, skipping the random init the weights replace.
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), no_init_weights():
            model = TeleFLMForCausalLM(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    load_weights(model, model_dir)
    if (model_dir / GENERATION_CONFIG_NAME).is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_dir, local_files_only=True)
    return model.eval(), tokenizer


# ----- export -----


def check_export_target(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"export target {out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(
            f"export target {out_dir} exists and is not empty (use --overwrite to replace it)"
        )


def replace_folder(new: Path, target: Path) -> None:
    """Put folder `new` at `target`, replacing whatever is there, by renames only."""
    if not target.exists():
        os.replace(new, target)
        return
    # Move the old folder aside first: a rename cannot replace a non-empty folder.
    old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old)


def make_tokenizer_config_portable(tokenizer_config: Path, context_length: int) -> None:
    """Make an export's tokenizer_config.json load the same in transformers 4 and 5:
    - transformers 5 names a plain fast tokenizer `TokenizersBackend`, unknown to 4;
      `PreTrainedTokenizerFast` is the same class in 5 and loads in both;
    - transformers 4's fast tokenizer returns `token_type_ids` unless told its model's inputs, and its
      `generate` refuses them (the card's quick start passes the tokenizer's output whole);
    - `model_max_length` is the model's context, so truncation and warnings know it."""
    fields = json.loads(tokenizer_config.read_text())
    if fields.get("tokenizer_class") == "TokenizersBackend":
        fields["tokenizer_class"] = "PreTrainedTokenizerFast"
    fields["model_input_names"] = ["input_ids", "attention_mask"]
    fields["model_max_length"] = context_length
    tokenizer_config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def write_config(config: TeleFLMConfig, path: Path) -> None:
    """config.json with every Tele-FLM field, leaving out generic transformers fields at their defaults."""
    from transformers import PretrainedConfig

    generic = PretrainedConfig().to_dict()
    fields = {
        k: v
        for k, v in config.to_dict().items()
        if k in OFFICIAL_CONFIG_FIELDS or k not in generic or v != generic[k]
    }
    path.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")


def new_file_mode() -> int:
    """The mode `open` gives a new file: 0o666 less the umask (which only setting it can read)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def write_safetensors(state: dict[str, torch.Tensor], out_dir: Path, max_shard_size: int | str) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(
        state, filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size
    )
    for filename, names in split.filename_to_tensors.items():
        # metadata format=pt: transformers checks it to know the file came from PyTorch.
        save_file({name: state[name] for name in names}, out_dir / filename, metadata={"format": "pt"})
        os.chmod(out_dir / filename, new_file_mode())  # safetensors creates its files 0600
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (out_dir / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def fold_depth_factor(state: dict[str, torch.Tensor], config: TeleFLMConfig) -> None:
    """Fold CompleteP's residual-branch multiplier 1 / mup_depth_factor into the branches' last
    projections (o_proj, down_proj: the branch is linear in them) and set the factor to 1, in place:
    the export computes the same function as plain Tele-FLM, which vLLM and the released model files
    run without knowing the field."""
    factor = getattr(config, "mup_depth_factor", 1.0) if config.use_mup else 1.0
    if factor == 1.0:
        return
    for name, t in state.items():
        if ".o_proj." in name or ".down_proj." in name:
            state[name] = (t.float() / factor).to(t.dtype)
    config.mup_depth_factor = 1.0


def write_generation_config(config: TeleFLMConfig, tokenizer, folder: Path) -> None:
    """generation_config.json: the special ids, and the padded embedding rows (past the tokenizer)
    suppressed, so that they are never generated, whoever calls `generate`."""
    from transformers import GenerationConfig

    pad_token_id = config.pad_token_id
    if pad_token_id is None and tokenizer is not None:
        pad_token_id = tokenizer.pad_token_id
    padded = padded_ids(tokenizer, config.vocab_size) if tokenizer is not None else []
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.eos_token_id if pad_token_id is None else pad_token_id,
        suppress_tokens=padded or None,
    )
    generation.save_pretrained(folder)


def write_tokenizer(tokenizer, tokenizer_dir: Path, folder: Path, context: int) -> None:
    """The tokenizer as AutoTokenizer loads it under every supported release."""
    # A tokenizer with the turn markers but trained before templates were saved with it gets the
    # instruct template, so `apply_chat_template` works on every export that can chat.
    add_chat_template(tokenizer)
    # tokenizer.json + tokenizer_config.json are all AutoTokenizer needs; the SentencePiece model
    # rides along for tools that read it directly.
    tokenizer.save_pretrained(folder)
    make_tokenizer_config_portable(folder / "tokenizer_config.json", context)
    if (tokenizer_dir / "tokenizer.model").is_file():
        shutil.copyfile(tokenizer_dir / "tokenizer.model", folder / "tokenizer.model")


def export_hf(
    model: TeleFLMForCausalLM,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
    max_shard_size: int | str = "2GB",
    dtype: torch.dtype | str | None = None,
) -> Path:
    """Write `model` (in memory, unsharded) as a Hugging Face folder that plain transformers loads
    with `trust_remote_code=True`; `dtype` defaults to the model's own. The folder is assembled in a
    temporary sibling and renamed into place at the end, so a failed export leaves nothing behind.
    Returns the folder."""
    out_dir = Path(out_dir)
    check_export_target(out_dir, overwrite)
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir is not None else None
    if tokenizer is not None:
        check_tokenizer_fits(tokenizer, model.config, tokenizer_dir)
    dtype = as_dtype(dtype) or next(model.parameters()).dtype

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 would become the export's, unreadable by the rest of a cluster.
    staging = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}")
    staging.mkdir()
    try:
        config = copy.deepcopy(model.config)
        state = {name: t.detach().to("cpu", dtype).contiguous() for name, t in model.state_dict().items()}
        fold_depth_factor(state, config)
        write_safetensors(state, staging, max_shard_size)
        del state

        config.architectures = ["TeleFLMForCausalLM"]
        config.auto_map = dict(AUTO_MAP)
        config.dtype = dtype
        write_config(config, staging / CONFIG_NAME)
        for source in MODEL_SOURCES:
            shutil.copyfile(Path(__file__).with_name(source), staging / source)

        write_generation_config(config, tokenizer, staging)
        if tokenizer is not None:
            write_tokenizer(tokenizer, Path(tokenizer_dir), staging, config.max_position_embeddings)
        readme = EXPORT_README.format(
            name=out_dir.name,
            oldest=OLDEST_TRANSFORMERS,
            context=config.max_position_embeddings,
            vocab=config.vocab_size,
        )
        (staging / "README.md").write_text(readme)
        check_export_target(out_dir, overwrite)  # it may have appeared meanwhile
        replace_folder(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
