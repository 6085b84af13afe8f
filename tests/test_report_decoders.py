"""The decoder-power view: a study over an autoregressive decoder's receptive field and a remedy runs end to
end, and its report shows KL, active units and I(x; z) per receptive field and remedy (the numbers of
summary.csv), says what they do, and says that the PixelCNN's images are drawn pixel by pixel. A study
without an autoregressive decoder, or with runs logged before `model.decoder` existed, has no such view."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
import yaml

from .test_report import BASE

# Small enough that the four trainings and their pixel-by-pixel images take seconds each on 2 CPU cores:
# a 4-channel PixelCNN with 3×3 masks, 2 latent dimensions (the traversals draw one image row per
# dimension), 16 prior samples and as many reconstructions, drawn pixel by pixel.
STUDY = {
    "name": "decoders_t", "sampler": "grid",
    "base": {**BASE, "data.binarize": "static", "model.channels": 4, "model.kernel_size": 3, "model.latent_dim": 2,
             "data.train_subset": 512, "train.epochs": 1, "eval.test_subset": 200, "eval.batch_size": 100,
             "eval.mi_batch": 100, "eval.n_samples": 16, "train.grid_images_autoregressive": 4,
             "objective.free_bits_lambda": 0.5},
    "space": {"model.decoder": ["mlp", "pixelcnn"], "model.decoder_depth": [1, 2], "objective.free_bits": ["none", "per_dim"]},
    # The MLP baseline at one depth and without remedy; free bits only where the receptive field is largest.
    "exclude": [{"model.decoder": "mlp", "model.decoder_depth": 2}, {"model.decoder": "mlp", "objective.free_bits": "per_dim"},
                {"model.decoder_depth": 1, "objective.free_bits": "per_dim"}],
    "seeds": [0],
    "objectives": [{"metric": "test/mutual_info", "direction": "maximize"}],
}
# (remedy, decoder as the table writes it, rows above): the table's order, remedy first, the MLP baseline first.
ROWS = [("none", "MLP (no autoregression)", 0), ("none", "PixelCNN, 1 row above (depth 1, k 3)", 1),
        ("none", "PixelCNN, 2 rows above (depth 2, k 3)", 2),
        ("free bits λ=0.5 nats/dim", "PixelCNN, 2 rows above (depth 2, k 3)", 2)]
COLUMNS = {"KL (nats)": "test/kl", "active units": "test/active_units", "I(x;z) (nats)": "test/mutual_info",
           "z-usage gap (nats)": "test/z_usage_gap"}


def _md_table(md: str, header_start: str) -> pd.DataFrame:
    lines = md[md.index(header_start):].splitlines()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("|")]
    cut = next((i for i, line in enumerate(lines) if not line.startswith("|")), len(lines))
    rows = rows[:cut]
    return pd.DataFrame(rows[2:], columns=rows[0])


def test_a_receptive_field_study_reports_decoder_power_and_pixel_by_pixel_images(home):
    from pipeline.report import report_stage
    from pipeline.study import run_study
    from pipeline.studyspec import load_study

    path = home / "decoders_t.yaml"
    path.write_text(yaml.safe_dump(STUDY, allow_unicode=True, sort_keys=False))
    spec = load_study(path)
    assert run_study(spec, log=lambda *_: None) is not None
    out = report_stage(spec, log=lambda *_: None, log_to_mlflow=False).parent
    md, html = (out / "report.md").read_text(), (out / "report.html").read_text()

    # The section sits right after Collapse, with its figure.
    assert re.findall(r"^## (.+)$", md, re.M) == ["Overview", "Collapse", "Decoder power",
                                                   "Inference and capacity", "Sharpness", "Trade-offs",
                                                   "About this report"]
    assert ">Decoder power</h2>" in html and 'id="fig-decoder_power"' in html
    assert (out / "figures" / "decoder_power.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "This figure could not be drawn" not in html

    table = _md_table(md, "| remedy | decoder | rows above |")
    assert list(zip(table.remedy, table.decoder, table["rows above"].astype(int))) == ROWS
    summary = pd.read_csv(out / "summary.csv").set_index("config")
    assert len(summary) == len(ROWS) and set(table.config) == set(summary.index)
    for _, row in table.iterrows():
        for column, metric in COLUMNS.items():
            mean = summary.loc[row.config, f"{metric}.mean"]
            assert float(row[column]) == pytest.approx(mean, rel=5e-4, abs=5e-4), (row.config, metric)  # 4 digits shown

    # The sentence under the figure states the numbers of the runs, not a fixed story.
    by = pd.read_csv(out / "summary.csv").set_index(["model.decoder", "model.decoder_depth", "objective.free_bits"])
    small, large = by.loc[("pixelcnn", 1, "none")], by.loc[("pixelcnn", 2, "none")]
    kl_from, kl_to = small["test/kl.mean"], large["test/kl.mean"]
    verb = "falls" if kl_to < kl_from else "rises"
    assert (f"**No remedy.** From the smallest receptive field of the autoregressive decoder (1 row above) to the "
            f"largest (2 rows above), KL {verb} from {kl_from:.3g} to {kl_to:.3g} nats") in md
    free_bits = by.loc[("pixelcnn", 2, "per_dim")]
    assert (f"**With free bits λ=0.5 nats/dim**, at 2 rows above, against no remedy: KL "
            f"{free_bits['test/kl.mean']:.3g} nats against {kl_to:.3g}") in md
    mlp = by.loc[("mlp", 1, "none")]
    assert f"The feed-forward baseline (MLP, no pixel seen) has KL {mlp['test/kl.mean']:.3g} nats" in md

    # Images and sharpness of the PixelCNN are samples, and every place that shows them says so.
    sharpness = md[md.index("## Sharpness"):md.index("## Trade-offs")]
    assert sharpness.count("drawn pixel by pixel: they are samples of p(x|z), not the likelihood's mean") == 3
    assert "Rows marked \"drawn pixel by pixel\"" in sharpness
    assert "Rows of feed-forward decoders are rendered as the likelihood's mean" in sharpness
    assert html.count("not comparable with those of feed-forward decoders") == 3


# --- without an autoregressive decoder: a study read from synthetic MLflow records ----------------------
def _records(runs: list[tuple[dict, int, dict]]) -> list[dict]:
    """MLflow records as tracking.study_runs returns them: (params, seed, test metrics) per run."""
    return [{"run_id": f"run{i}", "status": "FINISHED", "start_ms": 0, "end_ms": 1000,
             "tags": {"trial": str(i), "seed": str(seed)}, "params": {"model.latent_dim": "4", **params},
             "metrics": {"test/collapsed_dims": 0.0, "test/z_usage_gap": 5.0, **metrics}}
            for i, (params, seed, metrics) in enumerate(runs)]


def _analysis(study: dict, records: list[dict]):
    from pipeline.report.analysis import analyze
    from pipeline.report.collect import StudyData, _runs_table, _trials_table, factors_of
    from pipeline.studyspec import StudySpec

    spec = StudySpec(**study)
    factors = factors_of(spec)
    runs = _runs_table(spec, factors, records)
    data = StudyData(spec, factors, runs, _trials_table(spec, factors, runs, {}),
                     pd.DataFrame(columns=["run_id", "key", "step", "value"]), {}, None)
    data.compute_seconds = math.nan
    return analyze(data)


def test_runs_from_before_model_decoder_existed_are_feed_forward_and_get_no_decoder_power_view():
    from pipeline.report import figures as F
    from pipeline.report.sections import document, power_findings

    study = {"name": "old_t", "sampler": "grid", "space": {"objective.beta": [1, 4]}, "seeds": [0],
             "objectives": [{"metric": "test/mutual_info", "direction": "maximize"}]}
    # Logged before model.decoder and model.kernel_size were params: the decoder is model.arch's family.
    old = [({"model.arch": "conv", "model.decoder_depth": "3", "objective.beta": str(b)}, 0,
            {"test/kl": 5.0 / b, "test/active_units": 4.0, "test/mutual_info": 2.0 / b}) for b in (1, 4)]
    a = _analysis(study, _records(old))
    assert list(a.finished.decoder) == ["conv", "conv"] and not a.finished.autoregressive.any()
    assert list(a.finished.rows_above) == [0, 0] and set(a.finished.decoder_label) == {"conv (no autoregression)"}
    assert list(a.finished.remedy) == ["none", "β=4"]
    assert not a.autoregressive and a.power is None
    doc = document(a, {}, "journal", "sqlite")
    assert [s.title for s in doc.sections] == ["Overview", "Collapse", "Sharpness", "Trade-offs", "About this report"]
    assert F.decoder_power(a, None) == "The study has no autoregressive decoder."
    assert power_findings(a.finished) == ["No run of an autoregressive decoder has finished yet: nothing to compare."]
    sharpness = next(s for s in doc.sections if s.title == "Sharpness")
    assert not any("pixel by pixel" in getattr(b, "text", "") for b in sharpness.blocks)


def test_the_findings_are_computed_from_the_runs_with_seed_intervals():
    from pipeline.report.sections import power_findings

    study = {"name": "power_t", "sampler": "grid",
             "base": {"data.binarize": "static", "model.kernel_size": 5, "objective.free_bits_lambda": 0.25},
             "space": {"model.decoder": ["mlp", "pixelcnn"], "model.decoder_depth": [1, 4],
                       "objective.free_bits": ["none", "per_dim"]},
             "exclude": [{"model.decoder": "mlp", "model.decoder_depth": 4}], "seeds": [0, 1],
             "objectives": [{"metric": "test/mutual_info", "direction": "maximize"}]}
    # (decoder, depth, free bits) → (KL, AU, MI); seed 1 adds 0.2 to each, so every mean is the value + 0.1.
    values = {("mlp", 1, "none"): (20, 4, 4), ("mlp", 1, "per_dim"): (21, 4, 4),
              ("pixelcnn", 1, "none"): (10, 4, 3), ("pixelcnn", 4, "none"): (1, 1, 0.3),
              ("pixelcnn", 1, "per_dim"): (10, 4, 3), ("pixelcnn", 4, "per_dim"): (5.5, 3, 1.65)}
    runs = [({"model.decoder": dec, "model.arch": "mlp", "model.decoder_depth": str(depth), "model.kernel_size": "5",
              "objective.free_bits": fb, "objective.free_bits_lambda": "0.25"}, seed,
             {"test/kl": kl + 0.2 * seed, "test/active_units": au + 0.2 * seed, "test/mutual_info": mi + 0.2 * seed})
            for (dec, depth, fb), (kl, au, mi) in values.items() for seed in (0, 1)]
    a = _analysis(study, _records(runs))
    assert a.autoregressive
    assert list(zip(a.power.remedy, a.power.decoder_label)) == [
        ("none", "MLP (no autoregression)"), ("none", "PixelCNN, 2 rows above (depth 1, k 5)"),
        ("none", "PixelCNN, 8 rows above (depth 4, k 5)"), ("free bits λ=0.25 nats/dim", "MLP (no autoregression)"),
        ("free bits λ=0.25 nats/dim", "PixelCNN, 2 rows above (depth 1, k 5)"),
        ("free bits λ=0.25 nats/dim", "PixelCNN, 8 rows above (depth 4, k 5)")]
    none, free_bits = power_findings(a.finished)
    assert none == ("**No remedy.** From the smallest receptive field of the autoregressive decoder (2 rows above) to "
                    "the largest (8 rows above), KL falls from 10.1 to 1.1 nats, active units fall from 4.1 to 1.1 and "
                    "I(x; z) falls from 3.1 to 0.4 nats. The feed-forward baseline (MLP, no pixel seen) has KL 20.1 "
                    "nats, active units 4.1 and I(x; z) 4.1 nats.")
    # Made up of the loss from 2 to 8 rows: KL (5.6 − 1.1) / 9 = 50%, AU 2/3, MI 1.35/2.7 = 50%.
    assert free_bits == ("**With free bits λ=0.25 nats/dim**, at 8 rows above, against no remedy: KL 5.6 nats against "
                         "1.1 (making up 50% of what no remedy loses from 2 rows above to 8), active units 3.1 against "
                         "1.1 (making up 67% of what no remedy loses from 2 rows above to 8) and I(x; z) 1.75 nats "
                         "against 0.4 (making up 50% of what no remedy loses from 2 rows above to 8).")


def test_a_change_within_the_seed_intervals_is_not_called_a_fall():
    from pipeline.report.sections import _change

    cell = lambda mean, lo, hi: pd.Series({"mean": mean, "lo": lo, "hi": hi})  # noqa: E731
    assert _change("test/mutual_info", cell(3.0, 2.0, 4.0), cell(2.5, 1.5, 3.5)) == (
        "I(x; z) changes within the seed intervals from 3 to 2.5 nats")
    assert _change("test/active_units", cell(4.0, 3.5, 4.5), cell(1.0, 0.5, 1.5)) == "active units fall from 4 to 1"
    assert _change("test/kl", cell(1.0, math.nan, math.nan), cell(2.0, math.nan, math.nan)) == "KL rises from 1 to 2 nats"
