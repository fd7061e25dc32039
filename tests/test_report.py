"""pipelines/report.py: a self-contained report.html and a report.md from a synthetic `vqgen compare` folder."""

from __future__ import annotations

import base64
import copy
import html
import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
from PIL import Image, ImageDraw

from pipelines.report import format_value, write_report
from pipelines.result import CompareResult
from pipelines.verdict import METRICS, gan_health, gan_health_sentence, verdict

# VQGAN leads on fd_classifier, kid_mean, recall, class_hist_kl, class_accuracy, fid; VQ-VAE on precision;
# inception_score ties; kid_std has no direction; KID has the largest relative gap (0.05 vs 0.01 = 80%).
IMAGE_GENERATION = {
    "vqvae": dict(fd_classifier=40.0, kid_mean=0.05, kid_std=0.004, inception_score=5.0, precision=0.80, recall=0.40,
                  class_hist_kl=0.30, class_accuracy=0.70, fid=80.0, my_custom_score=3.0),
    "vqgan": dict(fd_classifier=12.0, kid_mean=0.01, kid_std=0.002, inception_score=5.0, precision=0.60, recall=0.55,
                  class_hist_kl=0.10, class_accuracy=0.85, fid=50.0, my_custom_score=4.0),
    "real": dict(fd_classifier=1.5, kid_mean=0.0001, kid_std=0.0003, inception_score=8.9, precision=0.75, recall=0.75,
                 class_hist_kl=0.01, class_accuracy=0.98),
}
IMAGE_RECONSTRUCTION = {
    "vqvae": dict(mse=0.01, psnr=26.0, ssim=0.90, fd_classifier=5.0, classifier_accuracy=0.95,
                  codebook_usage=60.0, perplexity=200.0, lpips_vgg=0.10, num_items=500, high_frequency_ratio=0.9),
    "vqgan": dict(mse=0.02, psnr=24.0, ssim=0.85, fd_classifier=3.0, classifier_accuracy=0.97,
                  codebook_usage=90.0, perplexity=350.0, lpips_vgg=0.05, num_items=500),
    "real": dict(classifier_accuracy=0.99, high_frequency_ratio=1.0),
}
TEXT_GENERATION = {  # distinct_1: VQ-VAE is higher but VQGAN is closer to real, so VQGAN is better
    "vqvae": dict(distinct_1=0.90, distinct_2=0.95, distinct_3=0.97, self_bleu4=0.05, length_mean=40.0, length_std=5.0,
                  length_min=10.0, length_max=64.0, ngram_perplexity=9.0, copy_rate=0.02, sentiment_agreement=0.55),
    "vqgan": dict(distinct_1=0.45, distinct_2=0.80, distinct_3=0.90, self_bleu4=0.15, length_mean=52.0,
                  length_std=12.0, length_min=3.0, length_max=64.0, ngram_perplexity=5.0, copy_rate=0.31,
                  sentiment_agreement=0.70),
    "real": dict(distinct_1=0.50, distinct_2=0.85, distinct_3=0.93, self_bleu4=0.20, length_mean=55.0, length_std=14.0,
                 length_min=2.0, length_max=64.0, ngram_perplexity=4.0, copy_rate=0.01, sentiment_agreement=0.80),
}
SCRIPT = "<script>alert('x')</script> & more"


def _grid(path: Path, seed: int, tiles: int = 8, side: int = 16) -> None:
    """A tiles x tiles grid of stroke 'digits', like torchvision's make_grid output."""
    import random

    rng = random.Random(seed)
    grid = Image.new("L", (tiles * (side + 2) + 2, tiles * (side + 2) + 2), 255)
    for row in range(tiles):
        for col in range(tiles):
            tile = Image.new("L", (side, side), 0)
            draw = ImageDraw.Draw(tile)
            for _ in range(3):
                draw.line([tuple(rng.randrange(2, side - 2) for _ in range(2)) for _ in range(2)], fill=255, width=2)
            grid.paste(tile, (2 + col * (side + 2), 2 + row * (side + 2)))
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


def _logs(root: Path, steps: int = 400, every: int = 5) -> None:
    """Noisy stage-1 and stage-2 metrics.jsonl logs; VQGAN logs disc_loss from step 200 on."""
    import random

    rng = random.Random(0)
    for index, variant in enumerate(("vqvae", "vqgan")):
        rows = [dict(step=s, rec_loss=(0.4 + 0.1 * index) * s ** -0.5 * rng.uniform(0.8, 1.2), quantizer_loss=0.01,
                     codebook_usage=min(100.0, (30 + 40 * index) * (1 + s / 200)), perplexity=(100 + 150 * index) *
                     (1 + s / 400), step_time=0.1, **({"disc_loss": 1.0} if variant == "vqgan" and s >= 200 else {}))
                for s in range(every, steps + 1, every)]
        for row in rows:
            row["loss"] = row["rec_loss"] + (0.3 * rng.random() if variant == "vqgan" and row["step"] >= 200 else 0.0)
        path = root / "tokenizers" / variant / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 41')  # a killed run's cut-off line
        prior = [dict(step=s, loss=3.0 - s / 400, bits_per_code=(4.0 - s / 300 - 0.3 * index) * rng.uniform(0.95, 1.05),
                      lr=1e-3, **({"val_nll": 2.5, "val_bits_per_code": 3.6 - s / 1000 - 0.3 * index}
                                  if s % 100 == 0 else {}))
                 for s in range(every, steps + 1, every)]
        path = root / "pipelines" / variant / "metrics.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("\n".join(json.dumps(r) for r in prior) + "\n")


def image_metrics() -> dict:
    return {
        "settings": dict(dataset="digits", modality="image", budget="quick", seeds=[0], class_conditional=True,
                         tokenizer_preset="tiny", prior_preset="tiny", tokenizer_steps=400, prior_steps=400,
                         num_eval_samples=360, guidance_scale=2.0, perceptual_backend="random-vgg",
                         elapsed_seconds=754.2, library_versions={"torch": "2.5.1", "vqgen": "0.1.0"},
                         class_names=["zero", "one"]),
        "classifier": dict(test_accuracy=0.987, weights_sha256="ab" * 32),
        "reconstruction": copy.deepcopy(IMAGE_RECONSTRUCTION),
        "generation": copy.deepcopy(IMAGE_GENERATION),
        "prior": {"vqvae": dict(val_nll=2.5, val_bits_per_code=3.6), "vqgan": dict(val_nll=2.2, val_bits_per_code=3.2)},
        "training": {v: dict(tokenizer_seconds=300.0, prior_seconds=120.5) for v in ("vqvae", "vqgan")},
        "figures": {
            "samples": {"vqvae": "figures/samples_vqvae.png", "vqgan": "figures/samples_vqgan.png",
                        "real": "figures/samples_real.png"},  # real is never written: it must become a note
            "reconstructions": {"vqvae": "figures/reconstructions_vqvae.png",
                                "vqgan": "figures/reconstructions_vqgan.png"},
        },
        "notes": ["LPIPS/FID not computed: weights unavailable offline"],
    }


def text_metrics() -> dict:
    return {
        "settings": dict(dataset="sst2", modality="text", budget="quick", seeds=[0], class_conditional=True),
        "classifier": dict(sentiment_test_accuracy=0.81),
        "reconstruction": {"vqvae": dict(byte_accuracy=0.97, exact_match=0.40, codebook_usage=75.0, perplexity=180.0),
                           "vqgan": dict(byte_accuracy=0.95, exact_match=0.30, codebook_usage=80.0, perplexity=190.0)},
        "generation": copy.deepcopy(TEXT_GENERATION),
        "text_samples": {"vqvae": {"positive": ["a fine film", SCRIPT], "negative": ["dull"]},
                         "vqgan": {"positive": ["warm and funny"], "negative": ["a mess\nof a film"]},
                         "real": ["a real review", "another one"]},
    }


def _swap(metrics: dict) -> dict:
    swapped = copy.deepcopy(metrics)
    for group in ("generation", "reconstruction"):
        swapped[group]["vqvae"], swapped[group]["vqgan"] = metrics[group]["vqgan"], metrics[group]["vqvae"]
    return swapped


def as_result(metrics: dict, width: float = 0.02) -> CompareResult:
    """A CompareResult of synthetic metrics with intervals of +-`width` (relative) around every variant value."""
    intervals = {group: {v: {k: [x * (1 - width), x * (1 + width)] for k, x in metrics[group][v].items()}
                         for v in ("vqvae", "vqgan") if v in metrics.get(group, {})}
                 for group in ("generation", "reconstruction") if group in metrics}
    result = CompareResult(**{k: copy.deepcopy(v) for k, v in metrics.items()}, intervals=intervals)
    result.verdict = verdict({g: result.generation if g == "generation" else result.reconstruction
                              for g in ("generation", "reconstruction")}, intervals,
                             metrics["settings"].get("seeds", [0]), metrics["settings"].get("num_eval_samples"),
                             metrics.get("gan_health"))
    return result


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("image_run")
    metrics = image_metrics()
    _logs(root)
    for index, (variant, path) in enumerate(metrics["figures"]["samples"].items()):
        if variant != "real":
            _grid(root / path, index)
    for variant, path in metrics["figures"]["reconstructions"].items():
        _grid(root / path, 10, tiles=2)
    html_path, md_path = write_report(root, as_result(metrics))
    return root, metrics, html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_run")
    metrics = text_metrics()
    html_path, md_path = write_report(root, as_result(metrics))
    return root, metrics, html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")


class _Tags(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def _tags(page: str, name: str) -> list[dict]:
    parser = _Tags()
    parser.feed(page)
    return [attrs for tag, attrs in parser.tags if tag == name]


def _marked(page: str, table: str, key: str) -> set[str]:
    row = re.search(rf'<tr data-table="{table}" data-metric="{key}"[^>]*>(.*?)</tr>', page)
    assert row, f"no row for {table}/{key}"
    return set(re.findall(r'<td class="num better" data-variant="(\w+)">', row.group(1)))


def _summary(page: str) -> str:
    return re.search(r'<p class="summary">(.*?)</p>', page, re.S).group(1)


@pytest.mark.parametrize("run", ["image_run", "text_run"])
def test_html_is_self_contained(run, request):
    root, _, page, _ = request.getfixturevalue(run)
    assert (root / "report.html").is_file() and (root / "report.md").is_file()
    for forbidden in ('src="http', "src='http", "<link", "<script", "@import", "url(http"):
        assert forbidden not in page.lower()
    images = _tags(page, "img")
    for attrs in images:
        assert attrs["src"].startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(attrs["src"].split(",", 1)[1]))) as image:
            assert image.format == "PNG"
            image.verify()
    if run == "image_run":  # 2 sample grids (real is missing), 2 reconstructions, 4 curve plots
        assert len(images) == 2 + 2 + 4  # curves: tokenizer loss, codebook, GAN health, prior
    else:
        assert images == []  # no figures and no logs: nothing to draw


def test_markdown_links_existing_pngs(image_run):
    root, _, _, markdown = image_run
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert "figures/curves_tokenizer_loss.png" in links and "figures/curves_prior.png" in links
    assert len(links) == 2 + 2 + 4
    for link in links:
        assert not link.startswith(("/", "http")) and (root / unquote(link)).is_file()


@pytest.mark.parametrize("run", ["image_run", "text_run"])
def test_every_metric_is_shown_with_its_description(run, request):
    _, metrics, page, markdown = request.getfixturevalue(run)
    for group in ("reconstruction", "generation", "prior", "training"):
        keys = {k for column in metrics.get(group, {}).values() for k in column}
        for key in keys:
            assert f'data-table="{group}" data-metric="{key}"' in page
            if key in METRICS:
                assert METRICS[key].description in html.unescape(page)
                assert f"(`{key}`)" in markdown and METRICS[key].description in markdown
            else:
                assert f"`{key}`" in markdown


def test_synthetic_runs_cover_every_metric():
    shown = {k for m in (image_metrics(), text_metrics()) for g in ("reconstruction", "generation", "prior", "training")
             for column in m.get(g, {}).values() for k in column}
    assert set(METRICS) <= shown


def test_a_clear_winner_is_marked_and_the_rest_is_not(image_run, text_run):
    _, _, page, markdown = image_run
    assert _marked(page, "generation", "fd_classifier") == {"vqgan"}  # lower is better, intervals apart
    assert _marked(page, "generation", "precision") == {"vqvae"}  # higher is better
    assert _marked(page, "generation", "inception_score") == set()  # equal: the intervals overlap
    assert 'data-metric="inception_score" data-outcome="unclear"' in page
    assert _marked(page, "generation", "kid_std") == set()  # no direction
    assert _marked(page, "generation", "my_custom_score") == set()  # unknown key
    assert _marked(page, "reconstruction", "mse") == {"vqvae"}
    assert _marked(page, "prior", "val_bits_per_code") == set()
    assert re.search(r"\| FD-classifier \(`fd_classifier`\) \| 40 \[39\.2, 40\.8\] \| \*\*12\*\* ▲ \[11\.8, 12\.2\] \| 1\.5 \|",
                     markdown)
    assert re.search(r'data-metric="classifier_accuracy"[^>]*>.*?data-variant="real">99%</td>', page)
    _, _, text_page, _ = text_run
    assert _marked(text_page, "generation", "distinct_1") == {"vqgan"}  # closer to real, although lower
    assert _marked(text_page, "generation", "length_max") == set()  # equal
    assert _marked(text_page, "generation", "length_min") == set()  # shown, not scored
    assert _marked(text_page, "generation", "length_mean") == {"vqgan"}


def test_spread_over_seeds_is_shown_beside_the_mean(tmp_path):
    result = as_result(image_metrics())
    result.spread = {"generation": {"vqvae": {"fd_classifier": 1.25}}}
    _, md_path = write_report(tmp_path, result)
    assert re.search(r"\| FD-classifier \(`fd_classifier`\) \| 40 ± 1\.2 \[39\.2, 40\.8\] \|", md_path.read_text())


@pytest.mark.parametrize(
    "value, unit, expected",
    [(0.98765, "fraction", "98.77%"), (62.5, "percent", "62.5%"), (12345.6, "", "12,350"), (3.14159, "", "3.142"),
     (0.000123456, "", "0.0001235"), (26.04, "dB", "26.04 dB"), (754.2, "seconds", "12 min 34 s"), (500, "", "500"),
     (math.inf, "", "∞"), (None, "", "—"), (True, "", "yes")],
)
def test_format_value(value, unit, expected):
    assert format_value(value, unit) == expected


def test_text_samples_are_escaped(text_run):
    _, _, page, markdown = text_run
    assert "<script>alert" not in page
    assert html.escape(SCRIPT, quote=False) in page or "&lt;script&gt;alert(&#39;x&#39;)" in page
    assert "Class: positive" in page and "a real review" in page  # per-class dicts and a plain list both shown
    assert SCRIPT in markdown and "a mess ⏎ of a film" in markdown


def test_missing_figure_is_a_note_not_a_broken_image(image_run):
    _, _, page, markdown = image_run
    assert re.search(r'<p class="missing">Real data samples: figures/samples_real\.png is missing', page)
    assert re.search(r'<ul class="notes">.*figures/samples_real\.png is missing', page, re.S)
    assert all(attrs.get("alt") != "Real data samples" for attrs in _tags(page, "img"))
    assert "*missing: figures/samples_real.png*" in markdown
    assert "LPIPS/FID not computed" in page


def test_summary_names_clear_winners_in_both_directions(image_run):
    _, metrics, page, markdown = image_run
    assert "<strong>VQGAN</strong> is clearly better on FD-classifier, KID" in _summary(page)
    assert "**VQ-VAE** is clearly better on Precision" in markdown
    assert "no clear difference on Classifier IS" in markdown
    assert "seed-to-seed variation was not measured" in markdown
    assert "real images against real images at the same N score 1.5" in markdown
    swapped = as_result(_swap(metrics)).verdict["summary"]
    assert "**VQ-VAE** is clearly better on FD-classifier, KID" in swapped and "**VQGAN** is clearly better on Precision" in swapped


def test_overlapping_intervals_name_no_winner():
    metrics = image_metrics()
    wide = as_result(metrics, width=0.9)  # every interval +-90%: they all overlap
    summary = wide.verdict["summary"]
    assert "is clearly better" not in summary and "On samples: no clear winner; no clear difference on" in summary
    assert all(e["outcome"] == "unclear" and e["winner"] is None
               for group in wide.verdict["metrics"].values() for e in group)


def test_without_intervals_nothing_is_called_clear(tmp_path):
    metrics = image_metrics()
    result = CompareResult(**copy.deepcopy(metrics))
    result.verdict = verdict({"generation": result.generation}, {}, [0], 360)
    assert "no interval for" in result.verdict["summary"] and "clearly" not in result.verdict["summary"]
    html_path, md_path = write_report(tmp_path, result)
    assert "No training logs were found" in md_path.read_text(encoding="utf-8")
    assert _marked(html_path.read_text(encoding="utf-8"), "generation", "fd_classifier") == set()


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="output_dir="):
        write_report(tmp_path / "absent", CompareResult(settings={}))
    with pytest.raises(TypeError, match="result must be a CompareResult"):
        write_report(tmp_path, {"generation": {}})


def test_gan_health_panel_and_summary(tmp_path):
    _logs(tmp_path)
    log = tmp_path / "tokenizers" / "vqgan" / "metrics.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines()[:-1]]
    for row in rows:
        if "disc_loss" in row:
            row.update(logits_real=0.01, logits_fake=0.01, disc_acc_real=0.5, disc_acc_fake=0.5, gan_weight=0.1)
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    metrics = image_metrics()
    metrics["gan_health"] = gan_health(rows)
    html_path, md_path = write_report(tmp_path, as_result(metrics))
    html_text, markdown = html_path.read_text(encoding="utf-8"), md_path.read_text(encoding="utf-8")
    assert (tmp_path / "figures" / "curves_gan_health.png").stat().st_size > 1000
    assert "GAN health" in html_text and "figures/curves_gan_health.png" in markdown
    assert "never separated real from reconstructed images" in _summary(html_text)
    assert "hinge loss 1.000" in markdown

    metrics["gan_health"] = dict(metrics["gan_health"], disc_loss=0.6, disc_acc_real=0.8, disc_acc_fake=0.7,
                                 separated=True)
    html_path, _ = write_report(tmp_path, as_result(metrics))
    summary = _summary(html_path.read_text(encoding="utf-8"))
    assert "discriminator separated real from reconstructed images" in summary and "80% on real" in summary


def test_a_discriminator_that_only_ranks_is_called_weak_not_absent():
    """Short of separating (55% right on real patches here) but ranking real above reconstructed (AUC 0.66), the
    summary says the signal is weak; at AUC 0.5 it says there was none."""
    rows = [{"step": s, "disc_loss": 0.87, "disc_acc_real": 0.54, "disc_acc_fake": 0.65, "disc_auc": 0.66,
             "logits_real": 0.2, "logits_fake": -0.1, "gan_weight": 0.02} for s in range(8)]
    weak = gan_health(rows)
    assert not weak["separated"] and weak["ranked"]
    sentence = gan_health_sentence(weak)
    assert "only weakly" in sentence and "separation AUC 0.66" in sentence and "never" not in sentence
    chance = gan_health([dict(row, disc_auc=0.5, disc_loss=0.99) for row in rows])
    assert not chance["ranked"] and "never separated" in gan_health_sentence(chance)
    assert "real from reconstructed text only weakly" in gan_health_sentence(weak, "text")  # the text modality
