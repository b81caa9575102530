"""SYNTHETIC sites (phantom/sites.py, ``cspine phantom --site``): every profile makes a valid case, the default
site is the phantom of before byte for byte, and each shifted profile moves image statistics and population the
way its description says."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from cspine.cli import main
from cspine.dicom.ingest import ingest_paths
from cspine.dicom.selection import select_series
from cspine.domain import SeriesRole
from cspine.phantom.anatomy import Label, sample_spine
from cspine.phantom.generate import (
    PhantomOptions,
    build_case,
    draw_anatomy,
    draw_study,
    generate_case,
)
from cspine.phantom.scanner import (
    Protocol,
    ScannerProfile,
    Scene,
    Shift,
    acquire_ct,
    acquire_mr,
    acquire_xr,
    varied_scanner,
)
from cspine.phantom.sites import DEFAULT_SITE, SITES, Population, get_site
from cspine.phantom.tumors import SUBTYPES, TumorClass, place_tumor

SHIFTED = [name for name in SITES if name != DEFAULT_SITE]

# Rendered CT of seed 5, case 1 (a metastasis, OPLL) with the phantom as it was before sites existed (commit
# 97d623d): the default site must keep drawing and rendering exactly this.
DEFAULT_CT_FINGERPRINT = "2d2945fd72861799360799f1bafa470a63ec0433af16da37b2430764850d9325"


def _fingerprint(case) -> str:
    digest = hashlib.sha256()
    for _, series in sorted(case.series.items(), key=lambda item: item[0].value):
        for array in (series.values, series.labels, series.levels):
            digest.update(np.ascontiguousarray(array).tobytes())
        digest.update(json.dumps(series.acquisition, sort_keys=True, default=str).encode())
    study = case.study
    digest.update(
        json.dumps([case.lesion, study.sex, study.age_years, str(study.date), case.ct_storage], sort_keys=True).encode()
    )
    return digest.hexdigest()


def test_there_are_three_shifted_sites_besides_the_default_and_each_shifts_scanner_and_population():
    assert len(SHIFTED) >= 3
    assert SITES[DEFAULT_SITE].is_default
    assert SITES[DEFAULT_SITE].scanner == ScannerProfile() and SITES[DEFAULT_SITE].population == Population()
    fingerprints = set()
    for name in SHIFTED:
        site = SITES[name]
        assert site.name == name and not site.is_default
        assert site.scanner != ScannerProfile() and site.population != Population(), name
        for protocol in (site.scanner.ct, site.scanner.mr, site.scanner.xr):
            assert protocol != Protocol(), f"{name}: every modality's protocol differs from the default"
        record = site.as_dict()
        assert record["synthetic"] is True and json.loads(json.dumps(record)) == record
        fingerprints.add(site.fingerprint())
    assert len(fingerprints) == len(SHIFTED)


def test_default_site_draws_and_renders_exactly_what_the_phantom_did_before_sites():
    options = PhantomOptions(modalities=("ct",), site="default")
    assert options.as_dict() == PhantomOptions(modalities=("ct",)).as_dict() and "site" not in options.as_dict()
    case = build_case("golden", 5, 0, options)
    assert _fingerprint(case) == DEFAULT_CT_FINGERPRINT, (
        "the default site no longer renders what the phantom rendered before sites; a deliberate change of the "
        "phantom's output must update DEFAULT_CT_FINGERPRINT"
    )


@pytest.mark.parametrize("site", list(SITES))
def test_every_site_writes_a_valid_synthetic_case_that_records_the_site(site, tmp_path):
    truth = generate_case(
        tmp_path / site, "case", 7, 2, PhantomOptions(modalities=("ct", "mr"), tumor="none", site=site)
    )
    on_disk = json.loads((tmp_path / site / "truth.json").read_text())
    assert on_disk == json.loads(json.dumps(truth)) and on_disk["synthetic"] is True
    if site == DEFAULT_SITE:
        assert "site" not in on_disk["options"]
    else:
        assert on_disk["options"]["site"] == SITES[site].as_dict()
    chosen = select_series(ingest_paths([tmp_path / site / "ct", tmp_path / site / "mr"])).chosen
    assert {SeriesRole.CT, SeriesRole.MR_T1, SeriesRole.MR_T2} <= set(chosen)
    for folder in ("ct", "mr"):
        ds = pydicom.dcmread(next((tmp_path / site / folder).glob("*.dcm")), stop_before_pixels=True)
        assert "SYNTHETIC" in ds.ImageComments and ds.InstitutionName.startswith("SYNTHETIC")
        assert (site in ds.InstitutionName) == (site != DEFAULT_SITE)
    ct = chosen[SeriesRole.CT].volume
    assert ct is not None
    assert ct.slice_thickness == pytest.approx(
        SITES[site].scanner.ct.thickness_mm or truth["series"]["ct"]["slice_thickness_mm"]
    )
    assert ct.pixel_spacing[0] == pytest.approx(truth["series"]["ct"]["pixel_spacing_mm"][0], abs=1e-4)


# --------------------------------------------------------------------------------------------------------
# Image statistics: the same scene and random streams, with and without a site's scanner


@pytest.fixture(scope="module")
def scene() -> Scene:
    return Scene(sample_spine(np.random.default_rng(4), None, 0.0), None)


def _render(scene: Scene, site: str) -> dict:
    scanner = None if site == DEFAULT_SITE else SITES[site].scanner
    centre = scene.spine.by_name["C4"].centre
    rng = np.random.default_rng
    ct = acquire_ct(scene, rng(1), Shift(), 0.5, roi=(centre, np.array([1e4, 1e4, 4.0])), scanner=scanner)
    t1, _ = acquire_mr(scene, rng(1), Shift(), 0.5, roi=(centre, np.array([2.0, 1e4, 1e4])), scanner=scanner)
    xr = acquire_xr(scene, rng(1), Shift(), 0.5, roi=(centre, np.array([1e4, 30.0, 30.0])), scanner=scanner)
    return {"ct": ct, "mr": t1, "xr": xr}


def _in_plane(mask: np.ndarray, iterations: int) -> np.ndarray:
    return ndimage.binary_erosion(mask, structure=np.ones((1, 3, 3)), iterations=iterations)


def _edge_gradient(values: np.ndarray, mask: np.ndarray, spacing: float) -> float:
    """Median over a mask's border of the steepest in-plane gradient nearby (image units per mm)."""
    values, mask = values.reshape(-1, *values.shape[-2:]), mask.reshape(-1, *mask.shape[-2:])
    border = mask & ~_in_plane(mask, 1)
    gradient = np.hypot(*np.gradient(values, axis=(1, 2))) / spacing
    return float(np.median(ndimage.maximum_filter(gradient, size=(1, 5, 5))[border]))


def _stats(series: dict) -> dict:
    ct, mr, xr = series["ct"], series["mr"], series["xr"]
    air = _in_plane(ct.labels == Label.BACKGROUND, 8) & (ct.values < -500)
    body = ct.labels != Label.BACKGROUND
    background = _in_plane(mr.labels == Label.BACKGROUND, 6)
    soft = ndimage.binary_erosion(xr.labels == Label.SOFT_TISSUE, iterations=5)
    image = xr.values[0]
    return {
        "ct_noise": float(ct.values[air].std()),
        "ct_sharpness": _edge_gradient(ct.values, body, ct.pixel_spacing[0]),
        "ct_spacing": ct.pixel_spacing[0],
        "ct_thickness": ct.slice_thickness,
        "ct_kernel": ct.acquisition["kernel"],
        "mr_snr": float(np.median(mr.values[mr.labels == Label.SOFT_TISSUE]) / mr.values[background].mean()),
        "mr_t1_csf_over_cord": float(
            np.median(mr.values[mr.labels == Label.CSF]) / np.median(mr.values[mr.labels == Label.CORD])
        ),
        "mr_field": mr.acquisition["field_strength"],
        "mr_thickness": mr.slice_thickness,
        "xr_noise": float((image - ndimage.gaussian_filter(image, 2.0))[soft].std()),
        "xr_sharpness": _edge_gradient(image, xr.labels == Label.VERTEBRAL_BODY, xr.pixel_spacing[0]),
    }


@pytest.fixture(scope="module")
def stats(scene) -> dict[str, dict]:
    return {site: _stats(_render(scene, site)) for site in SITES}


def test_community_ct_is_noisier_softer_coarser_and_thicker(stats):
    default, site = stats[DEFAULT_SITE], stats["community-ct"]
    assert site["ct_noise"] > 1.1 * default["ct_noise"]  # after the soft kernel, which lowers it again
    assert site["ct_sharpness"] < 0.6 * default["ct_sharpness"]
    assert site["ct_spacing"] > 1.2 * default["ct_spacing"] and site["ct_thickness"] == 3.0
    assert site["ct_kernel"] == "B20s"
    assert site["mr_snr"] < 0.8 * default["mr_snr"] and site["mr_field"] == 1.5 and site["mr_thickness"] == 4.0
    assert site["mr_t1_csf_over_cord"] > default["mr_t1_csf_over_cord"] + 0.1  # older sequences' weighting
    assert site["xr_noise"] > 1.2 * default["xr_noise"] and site["xr_sharpness"] < 0.95 * default["xr_sharpness"]


def test_mr_1p5t_has_lower_mr_snr_and_a_different_t1_t2_weighting(stats):
    default, site = stats[DEFAULT_SITE], stats["mr-1p5t"]
    assert site["mr_snr"] < 0.6 * default["mr_snr"]
    assert site["mr_field"] == 1.5 and site["mr_thickness"] == 4.0
    # T2 leaks into T1: CSF, dark next to the cord on T1, comes close to it
    assert default["mr_t1_csf_over_cord"] < 0.5 < 0.7 < site["mr_t1_csf_over_cord"]
    assert site["ct_noise"] > 1.1 * default["ct_noise"] and site["xr_noise"] > 1.1 * default["xr_noise"]


def test_high_res_sharp_is_sharper_finer_and_thinner(stats):
    default, site = stats[DEFAULT_SITE], stats["high-res-sharp"]
    assert site["ct_sharpness"] > 1.5 * default["ct_sharpness"]
    assert site["ct_spacing"] < 0.85 * default["ct_spacing"] and site["ct_thickness"] == 1.0
    assert site["ct_kernel"] == "B70s"
    assert site["ct_noise"] > default["ct_noise"]  # a sharp kernel amplifies noise
    assert site["mr_snr"] > default["mr_snr"] and site["mr_field"] == 3.0
    assert site["xr_sharpness"] > 1.5 * default["xr_sharpness"]


def test_a_site_composes_with_a_shift():
    protocol = SITES["community-ct"].scanner.ct
    composed = protocol.compose(Shift(noise=2.0, resolution=1.1, contrast=0.8, thickness=5.0))
    assert composed == Shift(
        noise=2.0 * protocol.noise,
        resolution=1.1 * protocol.resolution,
        contrast=0.8 * protocol.contrast,
        thickness=5.0,  # a Shift's thickness wins over the site's
    )
    assert protocol.compose(Shift()).thickness == protocol.thickness_mm
    assert Protocol().compose(Shift(noise=1.5)) == Shift(noise=1.5)


def test_varied_scanners_span_the_site_profiles_knobs_and_vary_from_draw_to_draw():
    draws = [varied_scanner(np.random.default_rng(i)) for i in range(200)]
    for modality in ("ct", "mr", "xr"):
        noise = [getattr(d, modality).noise for d in draws]
        sites = [getattr(SITES[name].scanner, modality).noise for name in SHIFTED]
        assert min(noise) <= min(sites) and max(noise) >= max(sites), modality
        assert any(getattr(d, modality).blur_mm > 0 for d in draws)
        assert any(getattr(d, modality).sharpen > 0 for d in draws)
    assert {d.mr_field_t for d in draws} == {1.5, 3.0}
    assert max(d.mr_weighting for d in draws) >= max(SITES[name].scanner.mr_weighting for name in SHIFTED)
    assert len({d for d in draws}) == len(draws)


def test_a_training_lesion_keeps_its_anatomy_and_changes_its_images_under_a_varied_scanner():
    from cspine.modeling.data import UNSEEN_SUBTYPES, lesion_sample
    from cspine.modeling.train import EmbedConfig

    subtype = UNSEEN_SUBTYPES[0]
    default = lesion_sample(5000, 3, subtype, (0.5, 0.5))
    assert np.array_equal(default, lesion_sample(5000, 3, subtype, (0.5, 0.5), scanners=0.0))
    varied = lesion_sample(5000, 3, subtype, (0.5, 0.5), scanners=1.0)
    assert varied.shape == default.shape and np.isfinite(varied).all()
    # the same lesion: its CT planes stay close (same HU window), but no modality is rendered alike
    changed = np.abs(varied - default).mean(axis=(1, 2, 3))
    assert (changed > 0.005).all(), changed
    assert np.corrcoef(varied[0].ravel(), default[0].ravel())[0, 1] > 0.8
    with pytest.raises(ValueError, match="between 0 and 1"):
        EmbedConfig(scanners=1.5)


# --------------------------------------------------------------------------------------------------------
# Population: anatomy and lesion plans drawn as plan_case draws them, without placing or rendering


def _population(site: str, count: int = 160) -> dict:
    options = PhantomOptions(site=site)
    classes, diameters, ages, degenerated, opll = [], [], [], [], []
    for index in range(count):
        rng = np.random.default_rng([31, index])
        plan, spine = draw_anatomy(rng, options)
        ages.append(draw_study(np.random.default_rng([32, index]), "c", 31, index, options).age_years)
        degenerated.append(sum(d.degeneration > 0.2 for d in spine.discs))
        opll.append(spine.opll is not None)
        if plan is not None:
            classes.append(plan.spec.tumor_class.value)
            tumor = place_tumor(rng, plan, spine, options.difficulty)
            diameters.append(2.0 * float(np.mean(tumor.blobs[0].radii)))
    return {
        "classes": {c.value: classes.count(c.value) / len(classes) for c in TumorClass},
        "diameter": float(np.median(diameters)),
        "ages": (min(ages), max(ages)),
        "degenerated_discs": float(np.mean(degenerated)),
        "opll": float(np.mean(opll)),
    }


@pytest.fixture(scope="module")
def populations() -> dict[str, dict]:
    return {site: _population(site) for site in SITES}


def test_each_site_draws_ages_within_its_range(populations):
    for site, population in populations.items():
        lo, hi = SITES[site].population.age_years
        assert lo <= population["ages"][0] <= population["ages"][1] <= hi, site
    assert populations["community-ct"]["ages"][0] > populations[DEFAULT_SITE]["ages"][1]


def test_sampled_class_shares_match_each_sites_expected_shares(populations):
    for site, population in populations.items():
        expected = SITES[site].population.class_shares()
        for name, share in population["classes"].items():
            assert share == pytest.approx(expected[name], abs=0.08), (site, name)


def test_community_ct_population_is_older_more_degenerated_with_more_hemangiomas_and_metastases(populations):
    default, site = populations[DEFAULT_SITE], populations["community-ct"]
    assert site["degenerated_discs"] > 1.5 * default["degenerated_discs"]
    assert site["opll"] > default["opll"] + 0.05
    assert site["classes"]["benign"] > default["classes"]["benign"] + 0.1
    assert site["classes"]["malignant"] > default["classes"]["malignant"]
    assert site["classes"]["borderline"] < default["classes"]["borderline"] - 0.15


def test_mr_1p5t_population_has_smaller_lesions_and_fewer_malignant_ones(populations):
    default, site = populations[DEFAULT_SITE], populations["mr-1p5t"]
    assert site["diameter"] < 0.85 * default["diameter"]
    assert site["classes"]["malignant"] < default["classes"]["malignant"] - 0.1
    assert site["degenerated_discs"] < default["degenerated_discs"]


def test_high_res_sharp_population_has_larger_lesions_more_borderline_and_fewer_benign_ones(populations):
    default, site = populations[DEFAULT_SITE], populations["high-res-sharp"]
    assert site["diameter"] > 1.15 * default["diameter"]
    assert site["classes"]["benign"] < default["classes"]["benign"] - 0.1
    assert site["classes"]["borderline"] > default["classes"]["borderline"] + 0.05


def test_expected_class_shares_follow_the_subtype_weights():
    default = Population().class_shares()
    expected = {c.value: 0.0 for c in TumorClass}
    for spec in SUBTYPES.values():
        expected[spec.tumor_class.value] += spec.frequency
    total = sum(expected.values())
    assert default == {c: round(v / total, 4) for c, v in expected.items()}
    assert SITES["community-ct"].population.class_shares()["malignant"] > default["malignant"]
    assert SITES["mr-1p5t"].population.class_shares()["malignant"] < default["malignant"]


# --------------------------------------------------------------------------------------------------------
# Options and the command line


def test_an_unknown_site_is_an_error_that_lists_the_known_ones(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown site 'nowhere': known sites are default, community-ct"):
        PhantomOptions(site="nowhere")
    with pytest.raises(ValueError, match="known sites are"):
        get_site("Default")
    assert main(["phantom", "--out", str(tmp_path / "x"), "--site", "nowhere", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "unknown site 'nowhere'" in err and all(name in err for name in SITES)
    assert not (tmp_path / "x").exists()


def test_cli_phantom_site_writes_the_site_into_truth_and_manifest(tmp_path, capsys):
    out = tmp_path / "cohort"
    args = ["phantom", "--out", str(out), "--seed", "3", "--modalities", "ct", "--tumor", "none", "--quiet"]
    assert main([*args, "--site", "mr-1p5t"]) == 0
    assert "SYNTHETIC case(s) of site mr-1p5t" in capsys.readouterr().out
    truth = json.loads((out / "case-0001" / "truth.json").read_text())
    manifest = json.loads((out / "cohort.json").read_text())
    assert truth["options"]["site"]["name"] == "mr-1p5t" and truth["options"]["site"]["synthetic"] is True
    assert truth["options"]["site"]["scanner"]["mr_field_t"] == 1.5
    assert manifest["options"]["site"] == truth["options"]["site"] and manifest["synthetic"] is True
