import nibabel as nib
import numpy as np

from medseg.data.phantom import LABELS, make_case


def test_phantom_is_seeded():
    a, b = make_case(7, 2), make_case(7, 2)
    np.testing.assert_array_equal(np.asarray(a.image.dataobj), np.asarray(b.image.dataobj))
    np.testing.assert_array_equal(np.asarray(a.label.dataobj), np.asarray(b.label.dataobj))
    c = make_case(8, 2)
    assert a.image.shape != c.image.shape or not np.array_equal(np.asarray(a.image.dataobj), np.asarray(c.image.dataobj))


def test_phantom_has_realistic_hounsfield_units_and_geometry():
    case = make_case(0, 0)
    hu = np.asarray(case.image.dataobj).astype(float)
    lab = np.asarray(case.label.dataobj)
    assert case.image.get_data_dtype() == np.int16 and case.label.get_data_dtype() == np.uint8
    assert set(np.unique(lab)) == {0, *LABELS}
    median = {name: np.median(hu[lab == value]) for value, name in LABELS.items()}
    assert 50 <= median["liver"] <= 72
    assert 38 <= median["spleen"] <= 60
    assert median["vertebrae"] > 200
    assert median["aorta"] > 140
    assert np.median(hu[(lab == 0) & (hu < -900)]) < -950  # air
    assert (hu < -900).mean() > 0.1 and ((hu > -150) & (hu < -50)).mean() > 0.02  # air and fat present
    zooms = case.image.header.get_zooms()
    assert zooms[0] == zooms[1] and zooms[2] > 1.5 * zooms[0]  # anisotropic: thick slices
    assert nib.aff2axcodes(case.image.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(make_case(0, 1).image.affine) == ("L", "P", "S")


def test_liver_is_not_separable_from_spleen_by_intensity():
    """The phantom must make a net learn shape and position: liver and spleen HU overlap heavily."""
    case = make_case(0, 0)
    hu = np.asarray(case.image.dataobj).astype(float)
    lab = np.asarray(case.label.dataobj)
    liver, spleen = hu[lab == 1], hu[lab == 2]
    lo, hi = np.percentile(liver, 5), np.percentile(liver, 95)
    assert ((spleen > lo) & (spleen < hi)).mean() > 0.5
