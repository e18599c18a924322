"""PreviewSpec: kohya prompt files, TOML/JSON, validation, fingerprint, batching."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from lora_monitor.spec import PreviewPrompt, PreviewSpec

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------- kohya .txt

KOHYA_TXT = """\
# preview prompts for my LoRA
masterpiece, 1girl, upper body --n low quality, worst quality --w 768 --h 512 --d 42 --s 28 --l 5.5

a cat on a sofa
   # an indented comment
a dog --N blurry --S 30
a bird --d 7 --l 0
"""


def test_kohya_txt_options_comments_blank_lines_and_defaults(tmp_path):
    spec = PreviewSpec.load(write(tmp_path, "prompts.txt", KOHYA_TXT), seed=100, steps=25, guidance_scale=6.0,
                            width=640, height=384, negative_prompt="ugly")
    assert len(spec) == 4
    assert spec.prompts[0] == PreviewPrompt(prompt="masterpiece, 1girl, upper body",
                                            negative_prompt="low quality, worst quality",
                                            seed=42, steps=28, guidance_scale=5.5, width=768, height=512)
    # defaults from the keyword arguments; seed = default seed + position among the prompts
    assert spec.prompts[1] == PreviewPrompt(prompt="a cat on a sofa", negative_prompt="ugly", seed=101,
                                            steps=25, guidance_scale=6.0, width=640, height=384)
    # option letters are case-insensitive, as in kohya
    assert (spec.prompts[2].negative_prompt, spec.prompts[2].steps, spec.prompts[2].seed) == ("blurry", 30, 102)
    assert (spec.prompts[3].seed, spec.prompts[3].guidance_scale) == (7, 0.0)


def test_kohya_txt_default_seed_assignment_is_stable(tmp_path):
    path = write(tmp_path, "p.txt", "one\n\n# skip\ntwo --d 9\nthree\n")
    spec = PreviewSpec.load(path)
    assert [p.seed for p in spec.prompts] == [0, 9, 2]
    assert PreviewSpec.load(path).fingerprint() == spec.fingerprint()
    assert [p.seed for p in PreviewSpec.load(path, seed=10).prompts] == [10, 9, 12]


def test_kohya_docs_example_loads(tmp_path):
    # the sample prompt lines of kohya sd-scripts' docs (train_network_advanced.md, flux_train_network.md)
    text = (
        "masterpiece, best quality, (1girl), in white shirts, upper body, looking at viewer, simple background "
        "--n low quality, worst quality, bad anatomy,bad composition, poor, low effort --w 768 --h 768 --d 1 --l 7.5 --s 28\n"
        "Japanese shrine in the summer forest. --n low quality, ugly --w 512 --h 512 --d 1 --l 4.0 --g 0.0 --s 20\n"
    )
    spec = PreviewSpec.load(write(tmp_path, "p.txt", text))
    assert [(p.width, p.height, p.seed, p.guidance_scale, p.distilled_guidance, p.steps) for p in spec.prompts] == [
        (768, 768, 1, 7.5, None, 28), (512, 512, 1, 4.0, 0.0, 20)]
    assert spec.prompts[0].negative_prompt == "low quality, worst quality, bad anatomy,bad composition, poor, low effort"


def test_kohya_options_we_do_not_use_warn_once_per_option_per_file(tmp_path):
    text = "a --ss euler_a --cn c.png\nb --ss ddim --ctr 0.5 --rcfg 1 --fs 3\nc --ss k_euler\n"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        spec = PreviewSpec.load(write(tmp_path, "p.txt", text))
    messages = [str(w.message) for w in caught]
    assert len(messages) == 5
    assert {w.filename for w in caught} == {__file__}  # each warning points at the code that loaded the file
    assert sum("--ss" in m for m in messages) == 1
    assert all("is ignored by lora-monitor" in m for m in messages)
    assert [p.prompt for p in spec.prompts] == ["a", "b", "c"]
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        PreviewSpec.load(write(tmp_path, "q.txt", text))
    assert len(again) == 5  # another file (or load) warns again


@pytest.mark.parametrize(
    "line,pattern",
    [
        ("a cat --q 3", r"p\.txt:2: unknown option --q; allowed options: --n, --w, --h, --d, --s, --l, --g, --ss"),
        ("a cat --w abc", r"p\.txt:2: --w 'abc' is not an integer; expected the width in pixels"),
        ("a cat --w 500", r"p\.txt:2: --w: width must be a positive multiple of 8, got 500"),
        ("a cat --h 0", r"p\.txt:2: --h: height must be a positive multiple of 8, got 0"),
        ("a cat --s 0", r"p\.txt:2: --s: steps must be an integer >= 1, got 0"),
        ("a cat --s 2.5", r"p\.txt:2: --s '2\.5' is not an integer"),
        ("a cat --d -1", r"p\.txt:2: --d: seed must be an integer in \[0, 2\*\*63\), got -1"),
        ("a cat --d 1,2", r"p\.txt:2: --d '1,2' is not an integer; expected the seed"),
        ("a cat --l x", r"p\.txt:2: --l 'x' is not a number"),
        ("a cat --l -1", r"p\.txt:2: --l: guidance_scale must be a finite number >= 0, got -1\.0"),
        ("a cat --l inf", r"p\.txt:2: --l: guidance_scale must be a finite number >= 0, got inf"),
        ("a cat --n", r"p\.txt:2: option --n needs a value"),
        ("a cat --w 512 --w 768", r"p\.txt:2: option --w is given more than once"),
        ("--w 512 --h 512", r"p\.txt:2: the prompt is empty: the line starts with an option \('--w'\)"),
        ("a cat -- ", r"p\.txt:2: ' --' is followed by no option name"),
    ],
)
def test_kohya_txt_bad_input_names_file_line_value_and_what_is_allowed(tmp_path, line, pattern):
    path = write(tmp_path, "p.txt", f"# header\n{line}\nfine prompt\n")
    with pytest.raises(ValueError, match=pattern) as error:
        PreviewSpec.load(path)
    assert str(path) in str(error.value)


def test_txt_with_no_prompts_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="contains no prompts"):
        PreviewSpec.load(write(tmp_path, "p.txt", "# only a comment\n\n"))


def test_missing_file_and_unknown_suffix(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match="preview prompt file not found") as error:
        PreviewSpec.load(missing)
    assert str(missing) in str(error.value)
    with pytest.raises(ValueError, match=r"suffix '\.yaml'; allowed suffixes: \.txt, \.toml, \.json"):
        PreviewSpec.load(write(tmp_path, "p.yaml", "a cat\n"))


def test_every_way_to_build_a_spec_renders_with_the_same_defaults_kohyas(tmp_path):
    """PREVIEW_DEFAULTS, the one place: a prompt built in code, from texts or read from any prompt file format gets
    kohya's sampler defaults (30 steps, 512x512) for what it does not set, and the family's CFG (None)."""
    from lora_monitor.spec import PREVIEW_DEFAULTS

    assert dict(PREVIEW_DEFAULTS) == {"steps": 30, "guidance_scale": None, "width": 512, "height": 512}
    files = [write(tmp_path, "p.txt", "a cat\n"), write(tmp_path, "p.json", '[{"prompt": "a cat"}]'),
             write(tmp_path, "p.toml", '[prompt]\n[[prompt.subset]]\nprompt = "a cat"\n')]
    prompts = [PreviewPrompt("a cat"), PreviewSpec.from_prompts(["a cat"]).prompts[0], *(PreviewSpec.load(path).prompts[0] for path in files)]
    assert [{name: getattr(prompt, name) for name in PREVIEW_DEFAULTS} for prompt in prompts] == [dict(PREVIEW_DEFAULTS)] * 5


def test_bad_load_defaults_are_reported_as_such(tmp_path):
    with pytest.raises(ValueError, match="invalid default passed to PreviewSpec.load: width must be a positive multiple of 8"):
        PreviewSpec.load(write(tmp_path, "p.txt", "a cat\n"), width=100)


# ---------------------------------------------------------------- .json / .toml

def test_json_kohya_entries_and_prompt_lines(tmp_path):
    data = [
        {"prompt": "a cat", "negative_prompt": "blurry", "width": 768, "height": 512, "scale": 5.0,
         "seed": 3, "sample_steps": 30},
        {"prompt": "a dog", "guidance_scale": 4, "steps": 12},
        "a bird --w 256 --h 256",
        {"prompt": "a fish", "sample_sampler": "euler_a"},
    ]
    with pytest.warns(UserWarning, match=r"p\.json: entry 3: kohya key 'sample_sampler'") as caught:
        spec = PreviewSpec.load(write(tmp_path, "p.json", json.dumps(data)), seed=10)
    assert [w.filename for w in caught] == [__file__]
    assert spec.prompts[0] == PreviewPrompt("a cat", "blurry", seed=3, steps=30, guidance_scale=5.0, width=768, height=512)
    # as kohya reads it: "guidance_scale" is FLUX's distilled guidance (--g), "scale" the CFG scale (--l)
    assert spec.prompts[1] == PreviewPrompt("a dog", "", seed=11, steps=12, distilled_guidance=4.0)
    assert (spec.prompts[2].width, spec.prompts[2].height, spec.prompts[2].seed) == (256, 256, 12)
    assert spec.prompts[3].seed == 13


def test_json_reads_to_dict_output(tmp_path):
    spec = PreviewSpec.from_prompts(["a", "b"], seed=5, width=256, guidance_scale=4.0)
    loaded = PreviewSpec.load(write(tmp_path, "p.json", json.dumps(spec.to_dict())))
    assert loaded == spec and loaded.prompts[0].guidance_scale == 4.0


def test_a_kohya_flux_entry_sets_cfg_and_distilled_guidance(tmp_path):
    data = [{"prompt": "a cat", "scale": 1.0, "guidance_scale": 3.5, "sample_steps": 20}]
    spec = PreviewSpec.load(write(tmp_path, "p.json", json.dumps(data)))
    assert (spec.prompts[0].guidance_scale, spec.prompts[0].distilled_guidance) == (1.0, 3.5)
    toml = '[prompt]\nscale = 1.0\nguidance_scale = 4.0\n[[prompt.subset]]\nprompt = "a dog"\n'
    spec = PreviewSpec.load(write(tmp_path, "p.toml", toml))
    assert (spec.prompts[0].guidance_scale, spec.prompts[0].distilled_guidance) == (1.0, 4.0)


@pytest.mark.parametrize(
    "data,pattern",
    [
        ([{"prompt": "a"}, {"prompt": "b", "colour": "red"}], r"p\.json: entry 1: unknown key 'colour'; allowed keys"),
        ([{"prompt": "a", "width": 500}], r"p\.json: entry 0: width must be a positive multiple of 8, got 500"),
        ([{"prompt": "a", "width": "512"}], r"p\.json: entry 0: width must be an integer, got '512'"),
        ([{"prompt": "a", "width": 512.0}], r"p\.json: entry 0: width must be an integer, got 512\.0"),
        ([{"prompt": "a", "seed": True}], r"p\.json: entry 0: seed must be an integer, got True"),
        ([{"negative_prompt": "x"}], r"p\.json: entry 0: no 'prompt' given"),
        ([{"prompt": ""}], r"p\.json: entry 0: prompt must be a non-empty string"),
        ([{"prompt": "a", "steps": 5, "sample_steps": 6}], r"p\.json: entry 0: 'steps' = 5 and 'sample_steps' = 6"),
        ([3], r"p\.json: entry 0: expected an object with a 'prompt' key, got int"),
        (["a --x 1"], r"p\.json: entry 0: unknown option --x"),
        ({"prompt": "a"}, r"p\.json: a JSON preview prompt file must hold a list"),
        ([], r"contains no prompts"),
    ],
)
def test_json_bad_input_names_file_and_entry(tmp_path, data, pattern):
    with pytest.raises(ValueError, match=pattern):
        PreviewSpec.load(write(tmp_path, "p.json", json.dumps(data)))


def test_json_syntax_error_names_file_and_line(tmp_path):
    with pytest.raises(ValueError, match=r"p\.json:3: invalid JSON"):
        PreviewSpec.load(write(tmp_path, "p.json", '[\n {"prompt": "a"},\n {"prompt": }\n]'))


KOHYA_TOML = """\
[prompt]
negative_prompt = "lowres, bad anatomy"
width = 768
height = 512
scale = 6.5
sample_steps = 24

[[prompt.subset]]
prompt = "a cat"
seed = 11

[[prompt.subset]]
prompt = "a dog"
width = 512
"""


def test_toml_kohya_defaults_and_subsets(tmp_path):
    spec = PreviewSpec.load(write(tmp_path, "p.toml", KOHYA_TOML), seed=20, steps=99)
    assert spec.prompts == (
        PreviewPrompt("a cat", "lowres, bad anatomy", seed=11, steps=24, guidance_scale=6.5, width=768, height=512),
        PreviewPrompt("a dog", "lowres, bad anatomy", seed=21, steps=24, guidance_scale=6.5, width=512, height=512),
    )


@pytest.mark.parametrize(
    "text,pattern",
    [
        (KOHYA_TOML + 'sampler = "ddim"\n', r"p\.toml: \[\[prompt\.subset\]\] entry 1: unknown key 'sampler'"),
        (KOHYA_TOML.replace("width = 768", "wdth = 768"), r"p\.toml: \[prompt\]: unknown key 'wdth'"),
        (KOHYA_TOML + "height = 100\n", r"p\.toml: \[\[prompt\.subset\]\] entry 1: height must be a positive multiple of 8"),
        ('[prompt]\nwidth = 512\n', r"p\.toml: \[prompt\] needs \[\[prompt\.subset\]\] entries"),
        ('[prompts]\nx = 1\n', r"p\.toml: .*unexpected top-level keys: \['prompts'\]"),
        ('[prompt\n', r"p\.toml: invalid TOML"),
    ],
)
def test_toml_bad_input_names_file_and_entry(tmp_path, text, pattern):
    with pytest.raises(ValueError, match=pattern):
        PreviewSpec.load(write(tmp_path, "p.toml", text))


# ---------------------------------------------------------------- programmatic construction

@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(prompt=""), "prompt must be a non-empty string"),
        (dict(prompt="   "), "prompt must be a non-empty string"),
        (dict(prompt=None), "prompt must be a non-empty string"),
        (dict(prompt="a", negative_prompt=None), "negative_prompt must be a string"),
        (dict(prompt="a", width=513), "width must be a positive multiple of 8, got 513"),
        (dict(prompt="a", height=-8), "height must be a positive multiple of 8, got -8"),
        (dict(prompt="a", steps=0), "steps must be an integer >= 1, got 0"),
        (dict(prompt="a", guidance_scale=float("nan")), "guidance_scale must be a finite number >= 0"),
        (dict(prompt="a", guidance_scale=-0.5), "guidance_scale must be a finite number >= 0"),
        (dict(prompt="a", seed=2**63), r"seed must be an integer in \[0, 2\*\*63\)"),
        (dict(prompt="a", seed=-1), r"seed must be an integer in \[0, 2\*\*63\)"),
        (dict(prompt="a", seed=1.0), "seed must be an integer, got 1.0"),
    ],
)
def test_preview_prompt_validates_on_construction(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        PreviewPrompt(**kwargs)


def test_preview_prompt_normalises_number_types():
    prompt = PreviewPrompt("a", guidance_scale=7, seed=2**63 - 1)
    assert isinstance(prompt.guidance_scale, float) and prompt.seed == 2**63 - 1
    assert PreviewSpec((prompt,)).fingerprint() == PreviewSpec((PreviewPrompt("a", guidance_scale=7.0, seed=2**63 - 1),)).fingerprint()


def test_spec_needs_prompts():
    with pytest.raises(ValueError, match="at least one prompt"):
        PreviewSpec(())
    with pytest.raises(ValueError, match=r"prompts\[1\] must be a PreviewPrompt, got str"):
        PreviewSpec((PreviewPrompt("a"), "b"))
    with pytest.raises(ValueError, match="not a single string"):
        PreviewSpec.from_prompts("a cat")
    assert isinstance(PreviewSpec([PreviewPrompt("a")]).prompts, tuple)


def test_from_prompts_assigns_consecutive_seeds():
    spec = PreviewSpec.from_prompts(["a", "b", "c"], seed=7, negative_prompt="n", steps=4, guidance_scale=2.0,
                                    width=64, height=128)
    assert [p.seed for p in spec.prompts] == [7, 8, 9]
    assert {(p.negative_prompt, p.steps, p.guidance_scale, p.width, p.height) for p in spec.prompts} == {
        ("n", 4, 2.0, 64, 128)}


def test_to_dict_from_dict_round_trip_and_strictness():
    spec = PreviewSpec.from_prompts(["a", "b"], seed=3, width=256)
    assert PreviewSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match=r"unknown PreviewSpec keys \['extra'\]"):
        PreviewSpec.from_dict({**spec.to_dict(), "extra": 1})
    with pytest.raises(ValueError, match=r"prompts\[0\]: unknown keys \['colour'\]"):
        PreviewSpec.from_dict({"prompts": [{"prompt": "a", "colour": 1}]})
    with pytest.raises(ValueError, match=r"prompts\[0\]: width must be a positive multiple of 8"):
        PreviewSpec.from_dict({"prompts": [{"prompt": "a", "width": 7}]})


# ---------------------------------------------------------------- fingerprint

BASE = PreviewSpec((PreviewPrompt("a cat", "blurry", seed=1, steps=20, guidance_scale=7.5, width=512, height=512),
                    PreviewPrompt("a dog", "", seed=2, steps=20, guidance_scale=7.5, width=512, height=768)))


def test_fingerprint_same_content_same_value():
    copy = PreviewSpec.from_dict(json.loads(json.dumps(BASE.to_dict())))
    assert copy is not BASE and copy.fingerprint() == BASE.fingerprint()
    assert len(BASE.fingerprint()) == 16 and int(BASE.fingerprint(), 16) >= 0


def test_fingerprint_is_pinned():
    # The canonical form names cached base renders on disk: changing it silently invalidates caches.
    assert BASE.fingerprint() == "d18cb6278b0fcb4f"


@pytest.mark.parametrize(
    "change",
    [
        dict(prompt="a cat "),
        dict(negative_prompt="blurry, ugly"),
        dict(seed=3),
        dict(steps=21),
        dict(guidance_scale=7.0),
        dict(width=768),
        dict(height=768),
    ],
)
def test_fingerprint_changes_with_any_field(change):
    changed = PreviewSpec((dataclasses.replace(BASE.prompts[0], **change), BASE.prompts[1]))
    assert changed.fingerprint() != BASE.fingerprint()


def test_fingerprint_depends_on_order():
    assert PreviewSpec(BASE.prompts[::-1]).fingerprint() != BASE.fingerprint()


def test_fingerprint_is_identical_in_a_fresh_process_with_another_hash_seed():
    code = (
        "from lora_monitor.spec import PreviewPrompt, PreviewSpec\n"
        "spec = PreviewSpec((PreviewPrompt('a cat', 'blurry', seed=1, steps=20, guidance_scale=7.5, width=512, height=512),"
        " PreviewPrompt('a dog', '', seed=2, steps=20, guidance_scale=7.5, width=512, height=768)))\n"
        "print(spec.fingerprint())\n"
    )
    outputs = {
        subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True,
                       env={"PYTHONHASHSEED": seed, "PATH": ""}).stdout.strip()
        for seed in ("1", "2")
    }
    assert outputs == {BASE.fingerprint()}


def test_spec_imports_without_torch():
    code = "import sys, lora_monitor.spec; print('torch' in sys.modules)"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == "False"


# ---------------------------------------------------------------- batches

def test_batches_group_by_render_settings_and_size():
    a = dict(width=512, height=512, steps=20, guidance_scale=7.5)
    b = dict(width=512, height=768, steps=20, guidance_scale=7.5)
    c = dict(width=512, height=512, steps=30, guidance_scale=7.5)
    d = dict(width=512, height=512, steps=20, guidance_scale=5.0)
    settings = [a, b, a, c, a, a, b, d, a]
    spec = PreviewSpec(tuple(PreviewPrompt(f"p{i}", seed=i, **s) for i, s in enumerate(settings)))
    assert spec.batches(2) == [[0, 2], [4, 5], [8], [1, 6], [3], [7]]
    assert spec.batches(10) == [[0, 2, 4, 5, 8], [1, 6], [3], [7]]
    assert spec.batches(1) == [[i] for i in (0, 2, 4, 5, 8, 1, 6, 3, 7)]
    assert spec.batches(2) == spec.batches(2)
    assert sorted(i for group in spec.batches(3) for i in group) == list(range(len(spec)))


def test_batches_ignore_seed_and_negative_prompt():
    spec = PreviewSpec((PreviewPrompt("a", "x", seed=1), PreviewPrompt("b", "y", seed=9)))
    assert spec.batches(4) == [[0, 1]]


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_batches_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="max_batch_size must be an integer"):
        BASE.batches(size)


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "p.txt"
    path.write_bytes("a cat\nun caf\xe9 --d 3\n".encode("latin-1"))
    with pytest.raises(ValueError, match=r"p\.txt:2: not UTF-8 \(byte 0xe9 at offset 12\); save the prompt file as UTF-8"):
        PreviewSpec.load(path)


def test_deeply_nested_json_is_a_message_not_a_recursion_error(tmp_path):
    path = write(tmp_path, "p.json", "[" * 100000 + "]" * 100000)
    with pytest.raises(ValueError, match=r"p\.json: JSON nested too deeply"):
        PreviewSpec.load(path)


# ---------------------------------------------------------------- size and step limits


@pytest.fixture
def default_limits(monkeypatch):
    """The built-in limits, whatever this shell sets."""
    from lora_monitor import spec

    monkeypatch.delenv(spec.MAX_PREVIEW_SIZE_ENV, raising=False)
    monkeypatch.delenv(spec.MAX_STEPS_ENV, raising=False)
    return spec


@pytest.mark.parametrize("line, message", [
    ("a cat --w 100000", r"p\.txt:2: --w: width must be at most 4096 pixels, got 100000; if that size is meant, raise the limit: "
                         r"LORA_MONITOR_MAX_PREVIEW_SIZE=100000 \(or lora_monitor\.spec\.MAX_PREVIEW_SIZE\)"),
    ("a cat --h 8192", r"p\.txt:2: --h: height must be at most 4096 pixels, got 8192; .* LORA_MONITOR_MAX_PREVIEW_SIZE=8192"),
    ("a cat --s 1000000000", r"p\.txt:2: --s: steps must be at most 1000, got 1000000000; if that many is meant, raise the limit: "
                             r"LORA_MONITOR_MAX_STEPS=1000000000 \(or lora_monitor\.spec\.MAX_STEPS\)"),
])
def test_huge_sizes_and_step_counts_in_a_prompt_file_name_the_line_value_limit_and_override(tmp_path, default_limits, line, message):
    path = write(tmp_path, "p.txt", f"a dog\n{line}\n")
    with pytest.raises(ValueError, match=message):
        PreviewSpec.load(path)


def test_size_and_step_limits_are_inclusive_and_can_be_raised(tmp_path, default_limits, monkeypatch):
    assert PreviewPrompt("a cat", width=4096, height=4096, steps=1000).width == 4096  # the limits themselves pass
    with pytest.raises(ValueError, match=r"^width must be at most 4096 pixels, got 100000;"):
        PreviewPrompt("a cat", width=100000)
    with pytest.raises(ValueError, match=r"^steps must be at most 1000, got 1001;"):
        PreviewPrompt("a cat", steps=1001)
    path = write(tmp_path, "p.json", json.dumps([{"prompt": "a cat", "width": 8192, "sample_steps": 2000}]))
    with pytest.raises(ValueError, match=r"p\.json: entry 0: steps must be at most 1000, got 2000"):
        PreviewSpec.load(path)
    with pytest.raises(ValueError, match="invalid default passed to PreviewSpec.load: width must be at most 4096"):
        PreviewSpec.load(write(tmp_path, "q.txt", "a cat\n"), width=5120)

    monkeypatch.setenv(default_limits.MAX_PREVIEW_SIZE_ENV, "8192")
    monkeypatch.setenv(default_limits.MAX_STEPS_ENV, "2000")
    loaded = PreviewSpec.load(path)
    assert (loaded.prompts[0].width, loaded.prompts[0].steps) == (8192, 2000)
    monkeypatch.setenv(default_limits.MAX_STEPS_ENV, "lots")
    with pytest.raises(ValueError, match=r"\$LORA_MONITOR_MAX_STEPS must be a whole number >= 1, got 'lots'"):
        PreviewPrompt("a cat")

    monkeypatch.delenv(default_limits.MAX_PREVIEW_SIZE_ENV)
    monkeypatch.delenv(default_limits.MAX_STEPS_ENV)
    monkeypatch.setattr(default_limits, "MAX_STEPS", 5000)  # the documented constant, for code that builds specs itself
    assert PreviewPrompt("a cat", steps=4000).steps == 4000
