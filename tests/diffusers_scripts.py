"""Helpers for tests/test_diffusers_scripts_real.py: README's lines inserted into diffusers' own example scripts.

Nothing of diffusers is copied here: the test reads the user's diffusers checkout at run time, and the
functions below insert the lines that README.md's section "Where the lines go in diffusers' example scripts"
gives, at the places it names (found by the quoted code, with Python's ast so that nesting is exact).
An anchor that is missing, or found where README says it is not, raises AnchorError naming the script
and the anchor: the script changed and README's section needs a look.
"""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# scripts by family: path under examples/, and whether README says the monitor goes by steps or epochs
SCRIPTS = {
    "flux": ("dreambooth/train_dreambooth_lora_flux.py", "steps"),
    "sd3": ("dreambooth/train_dreambooth_lora_sd3.py", "steps"),
    "sdxl": ("text_to_image/train_text_to_image_lora_sdxl.py", "epochs"),
}
REQUIREMENTS = {
    "flux": "dreambooth/requirements_flux.txt",
    "sd3": "dreambooth/requirements_sd3.txt",
    "sdxl": "text_to_image/requirements_sdxl.txt",
}


class AnchorError(AssertionError):
    pass


# ------------------------------------------------------------------------------------------ patching
@dataclass
class Patcher:
    """A script's source and the insertions made so far; every lookup re-parses the current text."""

    name: str
    source: str
    notes: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        return self.source.splitlines(keepends=True)

    def fail(self, message: str) -> AnchorError:
        return AnchorError(
            f"{self.name}: {message}. The script changed since README.md's section \"Where the lines go in "
            f"diffusers' example scripts\" was written: compare the two."
        )

    def tree(self) -> ast.Module:
        return ast.parse(self.source)

    def main(self) -> ast.FunctionDef:
        for node in self.tree().body:
            if isinstance(node, ast.FunctionDef) and node.name == "main":
                return node
        raise self.fail("no top-level `def main(args)`")

    def line_numbers(self, anchor: str, *, exact: bool = True, within: ast.AST | None = None) -> list[int]:
        """1-based numbers of the lines equal to `anchor` (stripped) or, exact=False, starting with it."""
        first, last = (within.lineno, within.end_lineno) if within is not None else (1, len(self.lines))
        found = []
        for number in range(first, last + 1):
            text = self.lines[number - 1].strip()
            if text == anchor or (not exact and text.startswith(anchor)):
                found.append(number)
        return found

    def one_line(self, anchor: str, *, exact: bool = True, within: ast.AST | None = None, which: str = "only") -> int:
        found = self.line_numbers(anchor, exact=exact, within=within)
        if not found:
            raise self.fail(f"anchor `{anchor}` not found{' in main()' if within is not None else ''}")
        if which == "only" and len(found) > 1:
            raise self.fail(f"anchor `{anchor}` found {len(found)} times (lines {found}), expected once")
        return found[-1] if which == "last" else found[0]

    @staticmethod
    def statement_in(body: list[ast.stmt], line: int) -> tuple[int, ast.stmt]:
        for index, statement in enumerate(body):
            start = min([statement.lineno] + [d.lineno for d in getattr(statement, "decorator_list", [])])
            if start <= line <= statement.end_lineno:
                return index, statement
        raise LookupError(line)

    def innermost(self, line: int) -> tuple[list[ast.stmt], int, ast.stmt]:
        """The innermost statement that starts at `line`, with the body holding it and its index there."""
        body: list[ast.stmt] = self.tree().body
        while True:
            index, statement = self.statement_in(body, line)
            if statement.lineno == line:
                return body, index, statement
            inner = None
            for name in ("body", "orelse", "finalbody", "handlers"):
                for child in getattr(statement, name, []) or []:
                    if child.lineno <= line <= child.end_lineno:
                        inner = getattr(statement, name)
            if inner is None:
                raise self.fail(f"line {line} is not the start of a statement")
            body = inner

    def text_of(self, node: ast.AST) -> str:
        return "".join(self.lines[node.lineno - 1 : node.end_lineno])

    def insert(self, after_line: int, code: str, indent: str, why: str) -> None:
        """Insert `code` (dedented, then indented by `indent`) after 1-based line `after_line` (0: at the top)."""
        block = "".join(indent + line if line.strip() else line for line in textwrap.dedent(code).strip("\n").splitlines(keepends=True))
        block += "\n"
        lines = self.lines
        lines.insert(after_line, block)
        self.source = "".join(lines)
        self.notes.append(f"after line {after_line}: {why}")

    @staticmethod
    def indent_of(node: ast.AST) -> str:
        return " " * node.col_offset

    # ------------------------------------------------------------------ README's places
    def import_lora_monitor(self) -> None:
        for node in self.tree().body:
            if isinstance(node, ast.Import) and any(alias.name == "torch" for alias in node.names):
                self.insert(node.end_lineno, "from lora_monitor import LoraMonitor, PreviewSpec", "", "import lora_monitor")
                return
        raise self.fail("no module-level `import torch`")

    def after_add_adapter(self, anchor: str, code: str, before: list[str]) -> None:
        """README step 1: after `anchor` (the denoiser's add_adapter) and the text encoders' add_adapter block
        that follows it, at main()'s level; checked to come before `before` (prefixes of lines, in this order)."""
        main = self.main()
        line = self.one_line(anchor, within=main)
        index, statement = self.statement_in(main.body, line)
        if statement.lineno != line:
            raise self.fail(f"`{anchor}` is nested in a block (line {statement.lineno}); README puts the monitor at main()'s level after it")
        following = main.body[index + 1] if index + 1 < len(main.body) else None
        if following is not None and isinstance(following, ast.If) and ".add_adapter(" in self.text_of(following):
            statement = following  # `if args.train_text_encoder: text_encoder_one.add_adapter(...)`
        previous, previous_anchor = statement.end_lineno, anchor
        for later in before:  # each found after the previous one: README's order
            found = [n for n in self.line_numbers(later, exact=False, within=main) if n > previous]
            if not found:
                raise self.fail(f"no `{later}` after `{previous_anchor}`: README says the monitor goes after `{anchor}` and before "
                                + ", then ".join(f"`{b}`" for b in before))
            previous, previous_anchor = found[0], later
        self.insert(statement.end_lineno, code, self.indent_of(statement), f"the monitor, after `{anchor}`")

    def after_prepare(self, anchor: str, code: str) -> None:
        """README: `monitor.attach(accelerator)` after the `accelerator.prepare(...)` of the denoiser (the whole
        statement at main()'s level, an `if args.train_text_encoder: ... else: ...` where the script has one)."""
        main = self.main()
        line = self.one_line(anchor, exact=False, within=main, which="last")
        _, statement = self.statement_in(main.body, line)
        self.insert(statement.end_lineno, code, self.indent_of(statement), "monitor.attach(accelerator) after accelerator.prepare")

    def epoch_loop(self) -> ast.For:
        main = self.main()
        line = self.one_line("for epoch in range(first_epoch, args.num_train_epochs):", within=main)
        _, _, loop = self.innermost(line)
        assert isinstance(loop, ast.For)
        return loop

    def after_global_step(self, code: str, *, checkpoint_next: bool) -> None:
        """README (steps): right after `global_step += 1`, inside `if accelerator.sync_gradients:`, before the
        block that saves checkpoint-<step> (checked when checkpoint_next)."""
        loop = self.epoch_loop()
        line = self.one_line("global_step += 1", within=loop)
        body, index, statement = self.innermost(line)
        if checkpoint_next:
            following = body[index + 1] if index + 1 < len(body) else None
            if not (isinstance(following, ast.If) and "checkpointing_steps" in self.text_of(following) and "save_state" in self.text_of(following)):
                raise self.fail("the statement after `global_step += 1` is not the block that saves checkpoint-<step>")
            if "is_main_process" not in self.lines[following.lineno - 1]:
                raise self.fail("the checkpoint block after `global_step += 1` is not `if accelerator.is_main_process:`")
        self.insert(statement.end_lineno, code, self.indent_of(statement), "monitor.on_step_end(global_step) after `global_step += 1`")

    def after_max_steps_break(self, code: str) -> None:
        """Stop the step loop: after the script's own `if global_step >= args.max_train_steps: break`."""
        loop = self.epoch_loop()
        line = self.one_line("if global_step >= args.max_train_steps:", within=loop)
        _, _, statement = self.innermost(line)
        self.insert(statement.end_lineno, code, self.indent_of(statement), "leave the step loop when monitor.should_stop")

    def end_of_epoch_loop(self, code: str) -> None:
        """Stop the epoch loop: the last statement of its body (after the script's validation block)."""
        loop = self.epoch_loop()
        last = loop.body[-1]
        self.insert(last.end_lineno, code, self.indent_of(last), "leave the epoch loop when monitor.should_stop")


def monitor_arguments(settings: dict) -> str:
    """LoraMonitor's policy keywords as source, from the test's settings."""
    return ", ".join(f"{name}={value!r}" for name, value in settings.items())


def patch_script(family: str, source: str, name: str, prompts: Path, settings: dict) -> Patcher:
    """The script with README's lines inserted (settings: LoraMonitor's policy keywords)."""
    patcher = Patcher(name, source)
    common = ", ".join(filter(None, [f"spec=PreviewSpec.load({str(prompts)!r})", 'output_dir=f"{args.output_dir}/monitor"', monitor_arguments(settings)]))
    patcher.import_lora_monitor()
    if family in ("flux", "sd3"):
        third = " text_encoder_3=text_encoder_three, tokenizer_3=tokenizer_three," if family == "sd3" else ""
        patcher.after_add_adapter(
            "transformer.add_adapter(transformer_lora_config)",
            f"""
            monitor = LoraMonitor(  # lora-monitor (README: Where the lines go in diffusers' example scripts)
                transformer=transformer, vae=vae, scheduler=noise_scheduler,
                text_encoder=text_encoder_one, tokenizer=tokenizer_one,
                text_encoder_2=text_encoder_two, tokenizer_2=tokenizer_two,{third}
                every_n_steps=args.checkpointing_steps, {common},
            )
            """,
            before=["del text_encoder_one, text_encoder_two", "transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare("],
        )
        patcher.after_prepare("transformer, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(", "monitor.attach(accelerator)  # lora-monitor")
        patcher.after_global_step("monitor.on_step_end(global_step)  # lora-monitor", checkpoint_next=True)
        patcher.after_max_steps_break("if monitor.should_stop:  # lora-monitor\n    break")
        patcher.end_of_epoch_loop("if monitor.should_stop:  # lora-monitor\n    break")
    elif family == "sdxl":
        patcher.after_add_adapter(
            "unet.add_adapter(unet_lora_config)",
            f"""
            monitor = LoraMonitor(  # lora-monitor (README: Where the lines go in diffusers' example scripts)
                unet=unet, vae=vae, text_encoder=text_encoder_one, tokenizer=tokenizer_one,
                text_encoder_2=text_encoder_two, tokenizer_2=tokenizer_two, scheduler=noise_scheduler,
                every_n_steps=args.checkpointing_steps, {common},
            )
            """,
            before=["unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare("],
        )
        patcher.after_prepare("unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(", "monitor.attach(accelerator)  # lora-monitor")
        patcher.after_global_step("monitor.on_step_end(global_step)  # lora-monitor", checkpoint_next=False)
        patcher.after_max_steps_break("if monitor.should_stop:  # lora-monitor\n    break")
        patcher.end_of_epoch_loop("if monitor.should_stop:  # lora-monitor\n    break")
    else:
        raise ValueError(f"no README placement for family {family!r}")
    ast.parse(patcher.source)  # the patched script still compiles
    return patcher


MIN_VERSION = re.compile(r"""^check_min_version\(["']([^"']+)["']\)\s*$""", re.M)


def relax_min_version(patcher: Patcher, installed: str) -> str | None:
    """diffusers' main-branch scripts call check_min_version("0.NN.0.dev0"). A released diffusers of that
    minor version or newer passes it. An older release would not: the call is commented out and a note
    returned (the run may then fail on an API the release lacks, and says so in its log)."""
    from packaging.version import Version

    match = MIN_VERSION.search(patcher.source)
    if match is None:
        return None
    required = Version(match.group(1))
    if Version(installed) >= required:
        return None
    patcher.source = patcher.source[: match.start()] + "# (lora-monitor test) " + match.group(0) + patcher.source[match.end():]
    note = f"{patcher.name} asks for diffusers >= {required}, the venv has {installed}: check_min_version commented out"
    patcher.notes.append(note)
    return note


# ------------------------------------------------------------------------------------------ venv
def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, command))} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def freeze(python: Path) -> dict[str, str]:
    lines = run([str(python), "-m", "pip", "freeze"]).stdout.splitlines()
    versions = {}
    for line in lines:
        if "==" in line:
            name, _, version = line.partition("==")
        elif " @ " in line:
            name, version = line.split(" @ ")[0], "local"
        else:
            continue
        versions[re.sub(r"[-_.]+", "-", name.strip()).lower()] = version.strip()
    return versions


def requirement_name(line: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[; ]", line.strip(), maxsplit=1)[0]).lower()


def satisfied(line: str, version: str) -> bool:
    from packaging.requirements import Requirement

    try:
        return Requirement(line).specifier.contains(version, prereleases=True)
    except Exception:  # an odd line or a local version: say so rather than guess
        return False


def peft_too_old_for_transformers(python: Path) -> str | None:
    """transformers' add_adapter (the scripts' --train_text_encoder) refuses a peft older than its
    MIN_PEFT_VERSION; transformers 5 asks for a peft newer than any released so far. The reason, or None."""
    code = (
        "import peft\n"
        "from packaging.version import Version\n"
        "from transformers import __version__ as tv\n"
        "from transformers.integrations.peft import MIN_PEFT_VERSION\n"
        "print(tv, MIN_PEFT_VERSION, peft.__version__, Version(peft.__version__) < Version(MIN_PEFT_VERSION))"
    )
    transformers, needed, installed, too_old = run([str(python), "-c", code]).stdout.split()
    if too_old == "True":
        return f"transformers {transformers}'s add_adapter needs peft >= {needed}, the venv has peft {installed}"
    return None


def build_venv(folder: Path, examples: Path, families, torch_spec: str, extra: str = "", log=print) -> Path:
    """A venv for the scripts: torch+torchvision (torch_spec), lora-monitor editable (brings diffusers, transformers,
    accelerate, peft), then each script's requirements that are not installed yet. A requirement whose package is
    already there at another version (requirements_sd3.txt pins peft==0.11.1) is left as it is, and logged.
    Built once: the marker file makes later runs reuse it. `extra` (pip arguments, e.g. "transformers==5.23.0")
    is installed last, at every call (pip does nothing when it is already satisfied)."""
    python = folder / "bin" / "python"
    marker = folder / ".lora-monitor-scripts"
    if not marker.exists():
        run([sys.executable, "-m", "venv", str(folder)])
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        run(pip + torch_spec.split())
        run(pip + ["-e", str(REPO)])
        marker.write_text("")
    installed = freeze(python)
    missing: list[str] = []
    for family in families:
        requirements = examples / REQUIREMENTS[family]
        for line in requirements.read_text().splitlines() if requirements.is_file() else []:
            line = line.strip()
            if not line or line.startswith(("#", "-")):
                continue
            name = requirement_name(line)
            if name in installed:
                if not satisfied(line, installed[name]):
                    log(f"{REQUIREMENTS[family]} asks for {line!r}: left at the installed {name} {installed[name]}")
                continue
            if line not in missing:
                missing.append(line)
    if missing:
        log(f"installing the scripts' requirements: {' '.join(missing)}")
        run([str(python), "-m", "pip", "install", "--quiet"] + missing)
    if extra.strip():
        log(f"installing DIFFUSERS_SCRIPTS_PIP_EXTRA: {extra}")
        run([str(python), "-m", "pip", "install", "--quiet"] + extra.split())
    return folder


# ------------------------------------------------------------------------------------------ data
def write_instance_images(folder: Path, size: int = 32, count: int = 4) -> Path:
    """`count` PNGs of coloured shapes (the folder holds nothing else: DreamBooth opens every file in it)."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    colours = ["red", "blue", "green", "orange", "purple", "teal"]
    for index in range(count):
        image = Image.new("RGB", (size, size), "white")
        draw = ImageDraw.Draw(image)
        if index % 2:
            draw.rectangle((4 + index, 6, size - 6, size - 4 - index), fill=colours[index % len(colours)])
        else:
            draw.ellipse((4, 4 + index, size - 4 - index, size - 4), fill=colours[index % len(colours)])
        image.save(folder / f"{index}.png")
    return folder


def write_imagefolder(folder: Path, size: int = 32, count: int = 4) -> Path:
    """An `imagefolder` dataset for the text-to-image scripts: the PNGs and metadata.jsonl with a "text" caption."""
    import json

    write_instance_images(folder, size, count)
    colours = ["red", "blue", "green", "orange", "purple", "teal"]
    with open(folder / "metadata.jsonl", "w") as handle:
        for index in range(count):
            shape = "square" if index % 2 else "circle"
            handle.write(json.dumps({"file_name": f"{index}.png", "text": f"a {colours[index % len(colours)]} {shape}"}) + "\n")
    return folder


def tail(text: str, lines: int = 60) -> str:
    return "\n".join(text.splitlines()[-lines:])


def script_env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
    }


# ------------------------------------------------------------------------------------------ checks
# Run with the scripts' venv: a fresh pipeline of the family renders the preview prompts without and with
# <monitor>/best (load_lora_weights), with the pipeline's plain call (prompt strings, its own defaults, a
# negative prompt only where the spec has one; SD-style UNets preview with DDIM), and compares them with
# the saved PNGs of previews/base and of the best evaluation.
VERIFY = """
import json, sys
import numpy as np, torch
from PIL import Image
from lora_monitor.spec import PreviewSpec
from lora_monitor.tiny import pipeline_class

family, model, monitor_dir, prompts = sys.argv[1:5]
spec = PreviewSpec.load(prompts)
sidecar = json.load(open(f"{monitor_dir}/best/lora_monitor.json"))
label = f"{sidecar['unit']}-{sidecar['epoch']:04d}"

def render(pipe):
    images = []
    for p in spec.prompts:
        extra = {"negative_prompt": p.negative_prompt} if p.negative_prompt else {}
        image = pipe(prompt=p.prompt, height=p.height, width=p.width, num_inference_steps=p.steps,
                     generator=torch.Generator().manual_seed(p.seed), output_type="np", **extra).images[0]
        images.append(np.round(image * 255))
    return images

def saved(folder):
    return [np.asarray(Image.open(f"{monitor_dir}/previews/{folder}/{i:02d}_seed{p.seed}.png").convert("RGB"), dtype=np.float64)
            for i, p in enumerate(spec.prompts)]

def largest(first, second):
    return max(float(np.abs(a - b).max()) for a, b in zip(first, second))

pipe = pipeline_class(family).from_pretrained(model)
if family in ("sd", "sdxl"):
    from diffusers import DDIMScheduler
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
base = render(pipe)
pipe.load_lora_weights(f"{monitor_dir}/best")
lora = render(pipe)
print("VERIFY " + json.dumps({
    "label": label, "adapters": pipe.get_list_adapters(),
    "fresh_base_vs_previews_base": largest(base, saved("base")),
    "fresh_lora_vs_previews_best": largest(lora, saved(label)),
    "fresh_lora_vs_fresh_base": largest(lora, base),
}))
"""


def peft_key(key: str) -> str:
    """One spelling for a LoRA key: diffusers' older text-encoder naming (lora_linear_layer.down/up, as
    convert_state_dict_to_diffusers writes it) as peft's lora_A/lora_B (as the Flux script saves its text encoder)."""
    return key.replace(".lora_linear_layer.down.", ".lora_A.").replace(".lora_linear_layer.up.", ".lora_B.")


def weights_differences(first: Path, second: Path) -> dict:
    """Compare two LoRA safetensors files: key sets (in one spelling, peft_key) and the largest absolute difference."""
    from safetensors.torch import load_file

    a = {peft_key(k): v for k, v in load_file(str(first)).items()}
    b = {peft_key(k): v for k, v in load_file(str(second)).items()}
    common = sorted(set(a) & set(b))
    return {
        "only_first": sorted(set(a) - set(b))[:5], "only_second": sorted(set(b) - set(a))[:5], "keys": len(common),
        "max_abs": max((float((a[k].float() - b[k].float()).abs().max()) for k in common), default=None),
    }
