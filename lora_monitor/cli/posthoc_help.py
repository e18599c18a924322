"""The help texts of the post-hoc commands (`epochs`, `strength`, `grid`): descriptions, examples and the
epilog that explains base models, signals, presets, relative bounds, the policy and the size rule.

Kept apart from the argument handling (lora_monitor/cli/posthoc.py) so that each file says one thing; the signal
lines come from the scorers' own `describe` and the preset lines from `PolicyPreset.rule`.
"""
from __future__ import annotations

import textwrap

from lora_monitor.policy import PRESETS
from lora_monitor.posthoc.checkpoints import families_help
from lora_monitor.posthoc.images import RESIZE_RULE
from lora_monitor.scoring.signals import (
    AdherenceScorer,
    ClipLikenessScorer,
    DiversityScorer,
    LikenessScorer,
    MemorizationScorer,
)


def _signals_help() -> str:
    lines = [
        "  brisque        no-reference image quality (BRISQUE); lower is better",
        "  ssim           colour SSIM against the base model's image of the same prompt and seed (--references)",
    ]
    for scorer in (LikenessScorer, ClipLikenessScorer, MemorizationScorer, AdherenceScorer, DiversityScorer):
        lines.append(f"  {scorer.name:<14} {scorer.describe}")
    return "\n".join(lines)


def _presets_help() -> str:
    lines = []
    for preset in PRESETS.values():
        extra = " Not available post-hoc: the validation loss needs the model and held-out images during training." if preset.name == "loss" else ""
        text = f"{preset.name}: metrics {','.join(preset.metrics)}; {preset.rule}{extra}"
        lines.append(textwrap.fill(text, width=100, initial_indent="  ", subsequent_indent="    "))
    return "\n".join(lines)

COMMON_EPILOG = f"""\
base models (--base): every family of the model-family table, where the installed diffusers has
its pipeline (an older diffusers is an error naming the release needed):
{families_help()}
The family is detected from the pipeline class the base model's model_index.json names (loaded
with diffusers' DiffusionPipeline). --family NAME forces it (the base then loads with that family's
pipeline class): for a folder whose pipeline class is none of these, or for a single
.safetensors/.ckpt file (without --family: guessed from its keys, SD 1.x/2.x unless it looks like
SDXL, SD3 or Flux). An unknown NAME is an error listing the families. Checkpoints load with the
pipeline's own load_lora_weights: diffusers-format LoRAs of every family, and kohya-format files
of SD 1.x/2.x, SDXL and Flux.1 (diffusers converts those; it reads no kohya SD3 files). A strength
scales the LoRA of the denoiser and of every text encoder the checkpoint carries one for (diffusers'
LoRA scale). SD 1.x/2.x and SDXL render with ddim unless --sampler says otherwise; the
flow-matching families (sd3, flux, sana, lumina2, chroma, qwenimage) only with their own scheduler.

step-based runs: a diffusers LoRA folder whose lora_monitor.json says "unit": "step" (the monitor's
every_n_steps exports, top_k/step-0020) and kohya name-step00000500.safetensors files are keyed by
step: labels, the table and the report say "step N" (JSON keeps the number in "epoch", with "unit").

signals (--metrics): each scores every preview; the JSON, CSV, table and report show every one:
{_signals_help()}
likeness, likeness_clip and memorization compare with the training images of --refs DIR; --references
is something else: the base model's images (LoRA off), which ssim compares with and which relative
bounds are measured on. adherence needs each preview's prompt text (--prompts/--prompt; trigger words
of --strip-words removed). diversity compares the seeds of each prompt: with --base render several
(--seeds-per-prompt N); with images, a {{seed}} in --pattern makes each seed a preview of its own, and
previews with the same prompt text are one prompt's seeds (kohya: repeat a prompt line with other --d).
--clip-model and --dino-model take a hub name already in the cache or a model folder.

presets (--preset): metrics, monitored metric and bounds in one word; --metrics, --metric and --bound
given explicitly win, by the rule of every command: the monitored metric is --metric, else the first
of --metrics when no --preset is named, else the preset's; the monitored and bounded metrics join the
metrics when missing. Without --preset the settings are quality's.
{_presets_help()}

relative bounds: a side written as a factor and x (--bound adherence=0.9x:) is that factor times the
base model's value: every metric is computed on the base images (--references, or the base renders
with --base) with the same scorers and aggregated the same way; the table, JSON ("base") and report
show these values, and bounds with their resolved numbers ("adherence >= 0.9x base = 0.243").

policy: the in-training monitor's rule. Candidates are scored in increasing order (epoch, then
strength); a later one becomes best only if it beats the best so far by more than --min-delta, so
ties within min_delta go to the earlier epoch / lower strength (--min-delta 0.01 with --metric
brisque is the older tools' rule). NaN/inf scores are the worst; --bound keeps a candidate out
unless a metric's aggregate lies in [LO, HI] (e.g. --bound ssim=0.3:0.95: not "no effect").

sizes: {RESIZE_RULE}

bad input: unreadable or truncated images are skipped and listed (a candidate missing a prompt's
image is left out); .ckpt/.pt/.pth/.bin pickles are refused unless --allow-pickle, and then read
with torch.load(weights_only=True).
"""

EPOCHS_DESCRIPTION = """\
Which saved epoch (or step) is best? With --base, PATH holds LoRA checkpoints (kohya
name-000003.safetensors or name-step00000500.safetensors files, diffusers LoRA folders with
pytorch_lora_weights.safetensors): each is loaded into the base model (SD 1.x/2.x, SDXL, SD3, Flux
or another family below; --family to force it) and the --prompts previews are rendered (plus the
base model's, the references), scored and ranked. Without --base, PATH is a folder of images: kohya
samples ({name}_e000003_00_{timestamp}_{seed}.png; a kohya output dir's sample/ is found; epoch-0
samples from --sample_at_first are the references), the older tools' epoch_01.png with
control_01.png per epoch or one control.png, or any names via --pattern. --references gives the
base model's image(s): one for every prompt or a folder with one per prompt. --refs gives the
training images that likeness and memorization compare with."""

STRENGTH_DESCRIPTION = """\
Which LoRA strength is best? With --base, PATH is one LoRA checkpoint: it is rendered at every
--strengths scale (diffusers' LoRA scale, on the denoiser and every text encoder the LoRA has; 0 is
the base model, which is also the reference), with a base model of any family below (--family to
force it).
Without --base, PATH is a folder of strength_0.5.png images with control_base.png (or
strength_0.png) as the reference, or names given by --pattern with {strength}."""

GRID_DESCRIPTION = """\
Which (epoch, strength) pair is best? Every checkpoint in PATH rendered at every --strengths scale
(with --base: a base model of any family below, --family to force it), or images named by a
--pattern with both {epoch} and {strength}."""

EXAMPLES = {
    "epochs": """\
examples:
  lora-monitor epochs output/sample/                       # kohya samples, epoch 0 as references
  lora-monitor epochs old_run/ --min-delta 0.01            # epoch_01.png + control_01.png
  lora-monitor epochs output/ --base runwayml/stable-diffusion-v1-5 --prompts prompts.txt --report report/
  lora-monitor epochs imgs/ --pattern "run_ep{epoch}_p{prompt}.png" --references base/ --csv > scores.csv
  lora-monitor epochs output/ --base MODEL --prompts prompts.txt --seeds-per-prompt 3 --preset likeness \\
      --refs train_images/ --strip-words sks --report report/   # likeness, within 0.9x/0.8x of the base's adherence/diversity
  lora-monitor epochs seeds/ --pattern "ep{epoch}_p{prompt}_s{seed}.png" --prompts prompts.txt \\
      --references base_per_seed/ --refs train_images/ --preset likeness --json   # {seed} separates each prompt's seeds
""",
    "strength": """\
examples:
  lora-monitor strength sweep/                              # strength_0.5.png + control_base.png
  lora-monitor strength output/mylora-000003.safetensors --base MODEL --prompts prompts.txt \\
      --strengths 0:1.5:0.1 --bound ssim=0:0.95 --report strength-report/
  lora-monitor strength flux-lora.safetensors --base black-forest-labs/FLUX.1-dev --prompts prompts.txt \\
      --dtype bfloat16 --strengths 0:1.2:0.2          # family detected: flux
  lora-monitor strength lora.safetensors --base my-sdxl-folder/ --family sdxl --prompts prompts.txt
""",
    "grid": """\
examples:
  lora-monitor grid output/ --base MODEL --prompts prompts.txt --strengths 0.5,0.75,1 --report grid/
  lora-monitor grid imgs/ --pattern "e{epoch}_s{strength}_{prompt}.png" --references base.png --json
""",
}
