import json
from pathlib import Path

import pytest

from medseg.config import Bundle, bundle_from_dict, flatten, load_bundle, parse_override
from medseg.errors import BundleError

BUNDLES = sorted((Path(__file__).resolve().parents[1] / "bundles").glob("*.json"))


def test_every_shipped_bundle_validates():
    assert {p.stem for p in BUNDLES} >= {"vnet", "unetr", "swin_unetr", "fcn2d"}
    for path in BUNDLES:
        bundle = load_bundle(path)
        assert isinstance(bundle, Bundle)
        assert bundle.data.labels and bundle.train.epochs >= 1


def test_shipped_bundles_share_one_protocol():
    """Same-protocol comparison: the shipped bundles differ only in the model, its ROI and length, UNETR's
    rate and the head's rate (V-Net, UNETR)."""
    protocol = None
    for name in ("vnet", "unetr", "swin_unetr", "fcn2d"):
        b = load_bundle(BUNDLES[0].parent / f"{name}.json")
        fields = (b.data.labels, b.data.spacing, b.data.normalization, b.data.ct_stats, b.train.sampling, b.train.augment,
                  b.train.loss, b.train.optimizer, b.train.scheduler, b.train.warmup, b.train.grad_clip,
                  b.sliding_window.overlap, b.sliding_window.mode, b.postprocess.largest_component)
        assert protocol is None or fields == protocol, name
        protocol = fields
        assert b.data.normalization == "ct" and b.data.ct_stats == "auto" and b.train.augment == "strong"
        assert b.postprocess.largest_component == b.data.labels  # single organs each
        assert b.train.iterations is not None and b.train.lr in (2e-3, 1e-3)
        assert b.train.head_lr_scale == {"vnet": 25, "unetr": 20}.get(name, 1)


def test_postprocess_classes_missing_from_the_labels_are_a_note_not_an_error():
    """The README trains a shipped bundle on other classes: its post-processing list then names
    classes the run does not have; they are skipped with a note naming them."""
    b = load_bundle(BUNDLES[0].parent / "unetr.json", ['data.labels=["liver","spleen","stomach"]'])
    note = b.postprocess.unknown(b.data.labels)
    assert note is not None and "'kidney_right', 'kidney_left' not in data.labels" in note
    assert load_bundle(BUNDLES[0].parent / "unetr.json").postprocess.unknown(["liver", "spleen", "kidney_right", "kidney_left"]) is None


def test_overrides_parse_json_else_string():
    assert parse_override("train.epochs=2") == (["train", "epochs"], 2)
    assert parse_override("data.labels=[\"liver\"]") == (["data", "labels"], ["liver"])
    assert parse_override("data.source=../shared/data/x") == (["data", "source"], "../shared/data/x")
    assert parse_override("train.amp=false") == (["train", "amp"], False)
    b = bundle_from_dict({}, ["train.epochs=3", "train.lr=0.001", "model.args.feature_size=12", "data.spacing=[2,2,2]"])
    assert b.train.epochs == 3 and b.train.lr == 1e-3
    assert b.model.args == {"feature_size": 12}
    assert b.data.spacing == [2.0, 2.0, 2.0] and all(isinstance(s, float) for s in b.data.spacing)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epoch=2", "unknown bundle key 'train.epoch'; did you mean 'epochs'?"),
        ("trian.epochs=2", "unknown bundle key 'trian'; did you mean 'train'?"),
        ("data.phantom.case=3", "unknown bundle key 'data.phantom.case'; did you mean 'cases'?"),
        ("train.epochs=two", "train.epochs must be an integer"),
        ("train.epochs=2.5", "train.epochs must be an integer"),
        ("train.amp=1", "train.amp must be true or false"),
        ("train.loss=dicece", "train.loss must be one of"),
        ("train.epochs=0", "train.epochs must be >= 1"),
        ("data.spacing=[1,1]", "data.spacing must be \"auto\" or 3 numbers between 0.05 and 50"),
        ("data.hu_window=[250,-175]", "data.hu_window must be [low, high]"),
        ("data.labels=[]", "data.labels must name at least one class"),
        ("data.labels=[\"background\",\"liver\"]", "must not list 'background'"),
        ("sliding_window.overlap=1.0", "sliding_window.overlap must be in [0, 1)"),
        ('postprocess.largest_component=["livr"]', "'livr' is not in data.labels; did you mean 'liver'?"),
        ("postprocess.largest_component=liver", "postprocess.largest_component must be a list"),
        ("train", "must look like section.key=value"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(BundleError) as e:
        bundle_from_dict({}, [override])
    assert message in str(e.value)


def test_bundle_file_errors(tmp_path):
    with pytest.raises(BundleError, match="bundle not found"):
        load_bundle(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(BundleError, match="JSON object"):
        load_bundle(bad)


def test_bundle_is_data_not_code(tmp_path):
    """Strings are never evaluated: an expression stays a string and fails type checks."""
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"train": {"epochs": "__import__('os').system('true')"}}))
    with pytest.raises(BundleError, match="train.epochs must be an integer"):
        load_bundle(path)


def test_resolved_bundle_round_trips_and_flattens():
    b = load_bundle(BUNDLES[0])
    again = bundle_from_dict(b.to_dict())
    assert again == b
    flat = flatten(b.to_dict())
    assert flat["train.lr"] == b.train.lr and flat["data.spacing"] == b.data.spacing


# ---------------------------------------------------------------------------------------------
# Property: whatever JSON a user writes, parsing a bundle ends in a Bundle or one BundleError.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from medseg.config import parse_checkpoint_every  # noqa: E402

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
_keys = st.sampled_from(["model", "data", "train", "sliding_window", "tracking", "description", "model.name", "model.args",
                         "data.labels", "data.spacing", "data.hu_window", "data.source_labels", "data.phantom", "train.roi",
                         "train.epochs", "train.lr", "train.checkpoint_every", "train.sampling", "train.pos_neg",
                         "sliding_window.roi", "sliding_window.overlap", "tracking.backend", "nonsense", "train.nonsense"])


def _nest(key: str, value):
    for part in reversed(key.split(".")):
        value = {part: value}
    return value


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_keys, _json), max_size=4))
def test_any_json_bundle_parses_or_fails_with_one_bundle_error(pairs):
    raw: dict = {}
    for key, value in pairs:
        node, parts = raw, key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = child if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    try:
        assert isinstance(bundle_from_dict(raw), Bundle)
    except BundleError as e:
        assert "\n" not in str(e) and str(e)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40))
def test_any_override_string_parses_or_fails_with_one_bundle_error(item):
    try:
        bundle_from_dict({}, [item])
    except BundleError as e:
        assert "\n" not in str(e)


def test_pathological_values_are_one_line(tmp_path):
    for item in ["train.lr=NaN", "train.epochs=Infinity", "data.spacing=[NaN,1,1]", "sliding_window.overlap=NaN",
                 "train.roi=" + "[" * 5000 + "]" * 5000, "train.roi=[20000,20000,1]", "train.checkpoint_every=soon"]:
        with pytest.raises(BundleError) as e:
            bundle_from_dict({}, [item])
        assert "\n" not in str(e.value)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(BundleError, match="nested too deeply"):
        load_bundle(deep)
    with pytest.raises(BundleError, match="is a folder"):
        load_bundle(tmp_path)


@given(st.text(max_size=10))
def test_checkpoint_every_is_parsed_or_refused(text):
    try:
        kind, value = parse_checkpoint_every(text)
    except ValueError:
        return
    assert kind in ("epoch", "it", "min") and value > 0
