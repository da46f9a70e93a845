"""Convert a MixLoRA adapter between a moelab run folder and the official checkpoint format
(adapter_config.json + adapter_model.bin, read by the `mixlora` package and by MoE-PEFT).

    python scripts/convert_mixlora.py to-official RUN_DIR OUT_DIR [--act-fn silu]
    python scripts/convert_mixlora.py from-official OFFICIAL_DIR RUN_DIR [--model smollm2_135m]

`from-official` loads the base model named by a conf/model entry, injects the checkpoint (every tensor is
checked against the model) and writes RUN_DIR/adapter as a training run does, for `scripts/evaluate.py`.
"""

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file

from moelab.adapters import config_from_dict
from moelab.adapters.mixlora import from_official, write_official
from moelab.modules.runs import read_adapter_meta
from moelab.modules.training import save_adapter

CONF = Path(__file__).resolve().parents[1] / "conf"


def to_official(run_dir: Path, out_dir: Path, act_fn: str) -> None:
    meta = read_adapter_meta(run_dir)
    if meta["method"] != "mixlora":
        raise SystemExit(f"{run_dir} holds a {meta['method']} adapter; only mixlora converts")
    state = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    base_model = meta["model"].get("pretrained") or meta["model"]["name"]
    write_official(state, config_from_dict("mixlora", meta["config"]), out_dir, base_model, act_fn)


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
    out.add_argument("--act-fn", default="silu", help="the base FFN's activation (the package needs it named)")
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
