"""Post-hoc analysis: which saved epoch, which LoRA strength, which (epoch, strength) pair is best.

Inputs are either images already on disk (kohya samples, the older tools' epoch_NN.png /
strength_X.png layouts, or a user's name pattern; `images`) or LoRA checkpoints (kohya
.safetensors files, diffusers LoRA folders) that are loaded into a base model of any family in the
family table and rendered with the in-training renderer (`checkpoints`). Either way every candidate (`candidates`) is scored and chosen exactly as
`LoraMonitor.evaluate` does (`analysis`): images rounded to 8 bits (`monitor.quantize`),
`score_images` with the same scorers, one `BestEpochPolicy.update` per candidate in increasing
order. So the same images give the same choice as the in-training monitor, and ties (within
min_delta) go to the earlier epoch or the lower strength. The embedding signals (likeness,
memorization, adherence, diversity) score too, and the base model's images are scored first for
bounds relative to the base ('0.9x').
"""
from lora_monitor.posthoc.analysis import (
    Analysis,
    CandidateResult,
    analyse,
    build_policy,
    check_groups,
    describe_bound,
    groups_from_prompts,
    make_scorers,
    measure_base,
    resolve_bound_side,
)
from lora_monitor.posthoc.candidates import Candidate, PosthocError, format_strength, parse_strengths
from lora_monitor.posthoc.checkpoints import (
    DIFFUSERS_LORA_FILE,
    PICKLE_SUFFIXES,
    Checkpoint,
    base_family,
    find_checkpoints,
    load_base_pipeline,
    load_lora_state_dict,
    lora_modules,
    lora_scale,
    render_checkpoints,
)
from lora_monitor.posthoc.images import (
    IMAGE_SUFFIXES,
    RESIZE_RULE,
    ImageSet,
    collect_images,
    harmonise_sizes,
    pattern_regex,
    read_image,
)

__all__ = [
    "DIFFUSERS_LORA_FILE",
    "IMAGE_SUFFIXES",
    "PICKLE_SUFFIXES",
    "RESIZE_RULE",
    "Analysis",
    "Candidate",
    "CandidateResult",
    "Checkpoint",
    "ImageSet",
    "PosthocError",
    "analyse",
    "base_family",
    "build_policy",
    "check_groups",
    "collect_images",
    "describe_bound",
    "find_checkpoints",
    "format_strength",
    "groups_from_prompts",
    "harmonise_sizes",
    "load_base_pipeline",
    "load_lora_state_dict",
    "lora_modules",
    "lora_scale",
    "make_scorers",
    "measure_base",
    "parse_strengths",
    "pattern_regex",
    "read_image",
    "render_checkpoints",
    "resolve_bound_side",
]
