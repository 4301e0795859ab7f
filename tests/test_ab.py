"""`promptcache ab`: the statistics on known data, a run through the procedural generator with
real BRISQUE scores, the command line (JSON, progress, missing extra) and bad input. CLIP is
tested with a tiny random CLIP model written to a temp dir (nothing is downloaded)."""

from __future__ import annotations

import json
import math
import socket
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats as scipy_stats

import ops.ab
from ops import cli
from ops.ab.prompts import prompt_set, read_prompt_file
from ops.ab.report import as_json, render
from ops.ab.run import run_ab
from ops.ab.scores import BrisqueScorer, find_clip
from ops.ab.stats import paired_bootstrap, paired_interval, paired_t
from promptcache.errors import ConfigError, GenerationRejected
from promptcache.generators.base import GeneratedImage, GenerationRequest
from promptcache.generators.procedural import ProceduralGenerator
from promptcache.optimizer import PolicySettings
from promptcache.prompts import normalize_params
from schemas.events import Params

# real prompts (PartiPrompts.tsv, imagereward_benchmark-prompts.json)
PROMPTS = [
    "a red block to the left of a blue pyramid",
    "a comic about a girl going to a farm",
    "a man with wild hair looking into a crystal ball",
    "portrait of a cyberpunk samurai, highly detailed, digital art, artstation",
]
REFUSED = "a decapitated knight on the battlefield"  # gore: refused by the default policy
SMALL = normalize_params(Params(width=256, height=256), default_model="procedural-v1")


@pytest.fixture(scope="module")
def brisque() -> BrisqueScorer:
    return BrisqueScorer()


@dataclass
class Recording:
    """The procedural generator, recording what it is sent; prompts in `refuse` fail."""

    refuse: set[str] = field(default_factory=set)
    sent: list[GenerationRequest] = field(default_factory=list)
    name: str = "procedural"
    default_model: str = "procedural-v1"
    truncates_prompt: bool = False

    async def generate(self, request: GenerationRequest) -> GeneratedImage:
        self.sent.append(request)
        if any(request.prompt.startswith(p) for p in self.refuse):
            raise GenerationRejected("the backend said no", code="generator_rejected")
        return await ProceduralGenerator(latency_ms=0).generate(request)

    async def aclose(self) -> None:
        return None


# --- statistics on known data ---------------------------------------------------------------

RAW = [1.0, 2.0, 3.0, 4.0, 5.0]
OPT = [2.0, 2.0, 5.0, 5.0, 6.0]  # differences 1, 0, 2, 1, 1: mean 1, sd sqrt(0.5)


def test_paired_t_interval_on_known_data():
    interval = paired_t(RAW, OPT)
    half = 2.7764451051977987 * math.sqrt(0.5) / math.sqrt(5)  # t(0.975, 4) x sd / sqrt(n)
    assert interval.n == 5 and interval.mean == pytest.approx(1.0)
    assert interval.low == pytest.approx(1.0 - half) and interval.high == pytest.approx(1.0 + half)
    assert interval.low == pytest.approx(0.122011, abs=1e-6)
    assert interval.high == pytest.approx(1.877989, abs=1e-6)
    assert interval.excludes_zero and interval.method == "t"
    # the same as scipy's paired t-test
    reference = scipy_stats.ttest_rel(OPT, RAW).confidence_interval(0.95)
    assert (interval.low, interval.high) == pytest.approx((reference.low, reference.high))


def test_paired_t_interval_spanning_zero_and_other_levels():
    interval = paired_t([0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 2.0, -2.0])
    assert interval.mean == 0.0 and interval.low < 0 < interval.high
    assert not interval.excludes_zero
    narrow = paired_t(RAW, OPT, level=0.80)
    assert paired_t(RAW, OPT).low < narrow.low < narrow.high < paired_t(RAW, OPT).high


def test_paired_interval_edge_cases():
    single = paired_t([1.0], [3.0])
    assert single.mean == 2.0 and single.low is None and single.high is None
    assert not single.excludes_zero
    constant = paired_t([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])
    assert (constant.low, constant.high) == (1.0, 1.0)
    with pytest.raises(ValueError):
        paired_t([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        paired_t([], [])


def test_paired_bootstrap_is_seeded_and_agrees_with_t_on_a_large_sample():
    rng = np.random.default_rng(7)
    raw = rng.normal(50, 10, 400)
    opt = raw + rng.normal(-2, 3, 400)  # a true difference of -2
    boot = paired_bootstrap(raw.tolist(), opt.tolist(), seed=1)
    t = paired_t(raw.tolist(), opt.tolist())
    assert boot.method == "bootstrap" and boot.mean == pytest.approx(t.mean)
    assert boot.low == pytest.approx(t.low, abs=0.1) and boot.high == pytest.approx(t.high, abs=0.1)
    assert boot.high < 0
    assert paired_bootstrap(raw.tolist(), opt.tolist(), seed=1) == boot
    same = paired_bootstrap([1.0, 2.0, 3.0], [3.0, 4.0, 5.0])
    assert (same.low, same.high) == (2.0, 2.0)
    assert paired_interval(RAW, OPT, "bootstrap").method == "bootstrap"
    assert paired_interval(RAW, OPT) == paired_t(RAW, OPT)


# --- BRISQUE --------------------------------------------------------------------------------

def test_brisque_model_comes_from_the_package(brisque):
    import brisque as package

    assert brisque.model_dir.is_relative_to(Path(package.__file__).parent)
    assert (brisque.model_dir / "svm.txt").is_file()


def test_brisque_scores_real_images_and_tells_them_apart(brisque):
    rng = np.random.default_rng(0)
    smooth = Image.fromarray(np.broadcast_to(
        np.linspace(0, 255, 128, dtype=np.uint8)[None, :, None], (128, 128, 3)).copy())
    noise = Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8))
    scores = [brisque.score(image, "") for image in (smooth, noise, noise.convert("L"))]
    assert all(isinstance(s, float) and math.isfinite(s) for s in scores)
    assert scores[0] != scores[1]
    assert brisque.score(Image.new("RGB", (64, 64), (128, 128, 128)), "") is None  # flat: no score


# --- a run through the procedural generator --------------------------------------------------

def _no_network(self: socket.socket, address: object) -> None:
    raise AssertionError(f"network connection to {address}")


async def test_run_reports_paired_brisque_for_every_prompt(brisque):
    generator = Recording()
    report = await run_ab(generator, PROMPTS, [brisque], params=SMALL, policy=PolicySettings(),
                          concurrency=2, seed=3)
    assert report.prompts == len(PROMPTS) and not report.refused and not report.failed
    assert len(generator.sent) == 2 * len(PROMPTS)
    for item in report.items:
        # raw: the prompt as typed, no negative; optimised: enhancers and default negatives
        assert item.sent["raw"] == item.prompt and item.negative["raw"] is None
        assert item.sent["optimised"] != item.prompt and item.negative["optimised"]
        raw, opt = item.scores["brisque"]["raw"], item.scores["brisque"]["optimised"]
        assert isinstance(raw, float) and isinstance(opt, float)
        assert math.isfinite(raw) and math.isfinite(opt)
    seeds = {request.prompt: request.seed for request in generator.sent}
    for item in report.items:  # both arms of a prompt share its seed
        assert seeds[item.sent["raw"]] == seeds[item.sent["optimised"]] == item.seed
    scores = [s for item in report.items for s in item.scores["brisque"].values()]
    assert len(set(scores)) == len(scores)  # different images, different scores
    (metric,) = report.metrics
    assert metric.name == "brisque" and metric.better == "lower" and metric.interval.n == 4
    raw = [item.scores["brisque"]["raw"] for item in report.items]
    opt = [item.scores["brisque"]["optimised"] for item in report.items]
    assert metric.raw_mean == pytest.approx(float(np.mean(raw)))
    assert metric.interval == paired_t(raw, opt)  # type: ignore[arg-type]

    data = as_json(report)
    assert set(data) >= {"generator", "model", "params", "baseline", "prompts", "pairs",
                         "refused", "failed", "metrics", "notes", "items", "difference"}
    brisque_json = data["metrics"]["brisque"]
    assert brisque_json["better"] == "lower" and brisque_json["n"] == 4
    assert brisque_json["ci"] == [metric.interval.low, metric.interval.high]
    json.dumps(data)
    text = render(report)
    assert "BRISQUE (lower is better)" in text and "95% CI (t)" in text


async def test_plain_baseline_sends_what_optimize_off_sends(brisque):
    generator = Recording()
    report = await run_ab(generator, ["a  red fox in the snow!!!"], [brisque], params=SMALL,
                          policy=PolicySettings(), baseline="plain")
    (item,) = report.items
    assert item.sent["raw"] == "a red fox in the snow!" and item.negative["raw"] is None
    assert item.sent["optimised"] == "a red fox in the snow, highly detailed, sharp focus"


async def test_refused_prompt_is_counted_and_never_generated(brisque):
    generator = Recording()
    progress: list[tuple[int, int]] = []
    report = await run_ab(generator, [PROMPTS[0], REFUSED, PROMPTS[1]], [brisque],
                          params=SMALL, policy=PolicySettings(),
                          progress=lambda done, total: progress.append((done, total)))
    assert [(r.prompt, r.code, r.category) for r in report.refused] == [
        (REFUSED, "blocked_content", "gore")]
    assert not any("decapitated" in request.prompt for request in generator.sent)
    assert len(report.items) == 2 and report.metrics[0].interval.n == 2
    assert progress[-1] == (4, 4) and len(progress) == 4
    assert "refused: blocked_content (gore)" in render(report)


async def test_failed_generation_is_counted_and_leaves_the_comparison(brisque):
    generator = Recording(refuse={PROMPTS[1]})
    report = await run_ab(generator, PROMPTS[:3], [brisque], params=SMALL,
                          policy=PolicySettings())
    (failed,) = report.failed
    assert failed.prompt == PROMPTS[1] and set(failed.errors) == {"raw", "optimised"}
    assert failed.errors["raw"].startswith("generator_rejected")
    assert report.metrics[0].interval.n == 2
    assert as_json(report)["pairs"] == 2


async def test_nothing_scored_gives_no_metric():
    generator = Recording(refuse=set(PROMPTS))
    report = await run_ab(generator, PROMPTS[:2], [BrisqueScorer()], params=SMALL,
                          policy=PolicySettings())
    assert report.metrics == [] and len(report.failed) == 2
    assert "nothing to compare" in render(report)


async def test_a_run_opens_no_network_connection(brisque, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    report = await run_ab(Recording(), PROMPTS[:2], [BrisqueScorer()], params=SMALL,
                          policy=PolicySettings(), save_dir=None)
    assert report.metrics[0].interval.n == 2


# --- prompt sets ---------------------------------------------------------------------------

def test_prompt_files(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("# a comment\n\n  a red fox  \na blue bird\n")
    assert read_prompt_file(text) == ["a red fox", "a blue bird"]
    tsv = tmp_path / "p.tsv"
    tsv.write_text("Prompt\tCategory\na red fox\tAnimals\n\tNone\n")
    assert read_prompt_file(tsv) == ["a red fox"]
    js = tmp_path / "p.json"
    js.write_text(json.dumps([{"prompt": "a red fox"}, "a blue bird", 3]))
    assert read_prompt_file(js) == ["a red fox", "a blue bird"]
    assert prompt_set(js, 1, seed=0) in (["a red fox"], ["a blue bird"])
    assert len(prompt_set(None, None, seed=0)) == 20  # the default sample
    assert prompt_set(None, 5, seed=1) == prompt_set(None, 5, seed=1)


@pytest.mark.parametrize(("name", "content", "message"), [
    ("empty.txt", "", "no prompts"),
    ("comments.txt", "# only a comment\n\n", "no prompts"),
    ("bad.json", "{not json", "not JSON"),
    ("object.json", '{"prompt": "x"}', "a JSON list"),
    ("nocolumn.tsv", "Text\nx\n", "no 'Prompt' column"),
])
def test_bad_prompt_files_are_clear_errors(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        prompt_set(path, None, seed=0)
    with pytest.raises(ConfigError, match="No such file"):
        prompt_set(tmp_path / "missing.txt", None, seed=0)


# --- the command line ----------------------------------------------------------------------

@pytest.fixture
def cli_env(monkeypatch, tmp_path):
    for name in ("PROMPTCACHE_GENERATOR", "PROMPTCACHE_POLICY_GORE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PROMPTCACHE_GENERATOR_LATENCY_MS", "0")
    monkeypatch.setenv("PROMPTCACHE_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("PROMPTCACHE_LOG_LEVEL", "WARNING")


def test_cli_ab_json(cli_env, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join([*PROMPTS[:3], REFUSED]) + "\n")
    code = cli.main(["ab", "--prompts", str(prompts), "--json", "--no-clip", "--param",
                     "width=256", "--param", "height=256", "--save-images",
                     str(tmp_path / "images")])
    out, err = capsys.readouterr()
    assert code == 0
    report = json.loads(out)
    assert report["generator"] == "procedural" and report["prompts"] == 4
    assert report["pairs"] == 3 and report["refused"][0]["category"] == "gore"
    assert report["params"]["width"] == 256
    assert report["metrics"]["brisque"]["n"] == 3
    assert any("say nothing about the optimizer" in note for note in report["notes"])
    assert "ab: 1/6 images" in err and "ab: 6/6 images" in err
    assert len(list((tmp_path / "images").glob("*-raw.png"))) == 3


def test_cli_ab_table_says_what_is_better(cli_env, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")
    code = cli.main(["ab", "--prompts", str(prompts), "--no-clip", "--ci", "bootstrap",
                     "--param", "width=256", "--param", "height=256"])
    out, _ = capsys.readouterr()
    assert code == 0
    assert "BRISQUE (lower is better)" in out and "95% CI (bootstrap)" in out
    assert "procedural generator is a stand-in" in out


def test_cli_ab_bad_input(cli_env, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert cli.main(["ab", "--prompts", str(empty), "--no-clip"]) == cli.RET_USAGE
    assert "no prompts" in capsys.readouterr().err
    assert cli.main(["ab", "--no-clip", "--param", "width=13"]) == cli.RET_USAGE
    assert "--param" in capsys.readouterr().err
    assert cli.main(["ab", "--no-clip", "--limit", "0"]) == cli.RET_USAGE
    only_refused = tmp_path / "refused.txt"
    only_refused.write_text(REFUSED + "\n")
    assert cli.main(["ab", "--prompts", str(only_refused), "--no-clip"]) == cli.RET_ERROR
    assert "nothing to compare" in capsys.readouterr().out


def test_cli_ab_without_the_extra_says_how_to_install(cli_env, monkeypatch, capsys):
    monkeypatch.setattr(ops.ab, "missing_extra", lambda: ["brisque"])
    assert cli.main(["ab"]) == cli.RET_USAGE
    err = capsys.readouterr().err
    assert "pip install -e '.[ab]'" in err and "missing: brisque" in err


def test_missing_extra_is_empty_when_installed():
    assert ops.ab.missing_extra() == []


# --- CLIP (a tiny random model made here: real loading code, nothing downloaded) ----------

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet, which CLIP's BPE vocabulary is built on."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch  # core dependencies (the semantic tier's model): never skipped
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    directory = tmp_path_factory.mktemp("tiny-clip")
    letters = list(_bytes_to_unicode().values())
    vocab = {token: i for i, token in enumerate(
        [*letters, *(f"{c}</w>" for c in letters), "<|startoftext|>", "<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(directory / "vocab.json"),
                                           str(directory / "merges.txt"))
    end = vocab["<|endoftext|>"]
    config = transformers.CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37,
                     "num_attention_heads": 4, "num_hidden_layers": 2,
                     "max_position_embeddings": 77, "eos_token_id": end, "pad_token_id": end,
                     "bos_token_id": vocab["<|startoftext|>"]},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4,
                       "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(directory)
    images = transformers.CLIPImageProcessor(size={"shortest_edge": 32},
                                             crop_size={"height": 32, "width": 32})
    transformers.CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(
        directory)
    return directory


@pytest.mark.slow
async def test_clip_similarity_from_a_local_model(tiny_clip, brisque, monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    clip, note = find_clip(str(tiny_clip))
    assert clip is not None and note is None
    generator = Recording()
    report = await run_ab(generator, PROMPTS[:3], [brisque, clip], params=SMALL,
                          policy=PolicySettings())
    assert [m.name for m in report.metrics] == ["brisque", "clip"]
    assert report.metrics[1].better == "higher" and report.metrics[1].interval.n == 3
    for item in report.items:
        values = item.scores["clip"]
        assert all(isinstance(v, float) and -100 <= v <= 100 for v in values.values())
    assert "CLIP similarity (higher is better)" in render(report)


def test_clip_absent_is_a_note_and_a_bad_path_an_error(monkeypatch, tmp_path):
    monkeypatch.setattr("ops.ab.scores.CLIP_CANDIDATES", ("promptcache-test/no-such-clip",))
    monkeypatch.setattr(socket.socket, "connect", _no_network)
    clip, note = find_clip(None)
    assert clip is None and note is not None and "nothing is downloaded" in note
    with pytest.raises(OSError):
        find_clip(str(tmp_path / "no-model-here"))
