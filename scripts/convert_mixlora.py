"""Convert a MixLoRA adapter between a moelab run folder and the official checkpoint format
(adapter_config.json + adapter_model.bin, read by the `mixlora` package and by MoE-PEFT).

    python scripts/convert_mixlora.py to-official RUN_DIR OUT_DIR [--act-fn NAME]
    python scripts/convert_mixlora.py from-official OFFICIAL_DIR RUN_DIR [--model smollm2_135m]

`to-official` writes the base FFN's activation read from the run's model config (the `model` entry of
RUN_DIR/adapter/adapter_config.json: the pretrained folder's config.json, or the model built in-process);
`--act-fn` overrides it, and is needed only when that config cannot be read.
`from-official` loads the base model named by a conf/model entry, injects the checkpoint (every tensor is
checked against the model) and writes RUN_DIR/adapter as a training run does, for `scripts/evaluate.py`.
"""

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoConfig

from moelab.adapters import AdapterConfigError, config_from_dict
from moelab.adapters.mixlora import ffn_activation, from_official, write_official
from moelab.modules.runs import read_adapter_meta
from moelab.modules.training import save_adapter

CONF = Path(__file__).resolve().parents[1] / "conf"


def run_activation(model: dict) -> str | None:
    """The base FFN's activation from a run's saved model entry; None when its config cannot be read."""
    try:
        if model.get("pretrained"):  # a local folder or a cached hub id: its config.json, no weights loaded
            config = AutoConfig.from_pretrained(model["pretrained"], revision=model.get("revision"))
        elif "_target_" in model:  # built in-process (tiny_random): cheap to build again
            config = instantiate(model).model.config
        else:
            return None
    except (OSError, ValueError, InstantiationException):
        return None
    return ffn_activation(config)


def to_official(run_dir: Path, out_dir: Path, act_fn: str | None) -> None:
    meta = read_adapter_meta(run_dir)
    if meta["method"] != "mixlora":
        raise SystemExit(f"{run_dir} holds a {meta['method']} adapter; only mixlora converts")
    act_fn = act_fn or run_activation(meta["model"])
    if act_fn is None:
        raise SystemExit(f"{run_dir}: cannot read the base model's activation from its model config "
                         f"{meta['model']}; name it with --act-fn")
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    base_model = meta["model"].get("pretrained") or meta["model"]["name"]
    try:
        write_official(state, config_from_dict("mixlora", meta["config"]), out_dir, base_model, act_fn)
    except AdapterConfigError as error:
        raise SystemExit(f"{run_dir} does not export to the official format: {error}") from error


def from_official_folder(official_dir: Path, run_dir: Path, model: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"model={model}", "adapter=mixlora"])
    base = instantiate(cfg.model)
    adapter = from_official(base.model, official_dir)
    save_adapter(run_dir / "adapter", base, adapter, cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    out = commands.add_parser("to-official", help="moelab run folder -> official checkpoint folder")
    out.add_argument("run_dir", type=Path)
    out.add_argument("out_dir", type=Path)
    out.add_argument("--act-fn", default=None,
                     help="override the base FFN's activation read from the run's model config (an ACT2FN name)")
    back = commands.add_parser("from-official", help="official checkpoint folder -> moelab adapter folder")
    back.add_argument("official_dir", type=Path)
    back.add_argument("run_dir", type=Path)
    back.add_argument("--model", default="smollm2_135m", help="conf/model entry of the base model")
    args = parser.parse_args(argv)
    if args.command == "to-official":
        to_official(args.run_dir, args.out_dir, args.act_fn)
        print(f"[moelab] official MixLoRA checkpoint written to {args.out_dir}")
    else:
        from_official_folder(args.official_dir, args.run_dir, args.model)
        print(f"[moelab] moelab adapter written to {args.run_dir / 'adapter'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
