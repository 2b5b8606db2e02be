"""The preview PNG: a readable image, distinct saturated colours, slices through the organs, and
titles and legend inside the canvas (checked on the rendered figure, not on the code's intent)."""

import itertools

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402

from medseg.viz import render_preview, save_preview, slice_centre  # noqa: E402

MIN_DELTA_E = 25.0  # CIELAB ΔE76 between any two of the first 20 class colours (2.3 is just noticeable)
MIN_CHROMA = 40.0  # CIELAB chroma of every class colour: greys have ~0, a pale tint ~15


def srgb_to_lab(rgb) -> np.ndarray:
    """sRGB in [0, 1] -> CIELAB (D65), written here from the standard formulas so the check does not
    reuse the code under test."""
    rgb = np.asarray(rgb, float)
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


def abdomen(n_organs: int = 3, shape=(48, 40, 60)):
    """A CT-like volume (RAS, 1 x 1 x 2 mm): ``n_organs`` small organs on a grid in the upper part
    (z from 63% of the height) and a large "muscle" class (value 99) filling most of the lower part."""
    nx, ny, nz = shape
    x, y = np.meshgrid(np.arange(nx), np.arange(ny), indexing="ij")
    ct = np.repeat(np.where((x - nx / 2) ** 2 + (y - ny / 2) ** 2 < (0.45 * min(nx, ny)) ** 2, 40, -1000)[..., None], nz, axis=2)
    seg = np.zeros(shape, np.uint8)
    seg[nx // 6 : 5 * nx // 6, ny // 6 : 5 * ny // 6, 1 : nz // 2] = 99
    z0, dz = int(0.63 * nz), max(nz // 10, 2)
    for k in range(n_organs):  # 4 per row in x, rows along y, each one step higher in z than the last
        ix, iy = k % 4, k // 4
        xs, ys = slice(nx * (1 + 2 * ix) // 9, nx * (2 + 2 * ix) // 9), slice(ny * (1 + iy) // 7, ny * (2 + iy) // 7)
        seg[xs, ys, z0 + k % 3 : z0 + k % 3 + dz] = k + 1
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    names = {0: "background", 99: "muscle", **{k + 1: f"organ_{k + 1}" for k in range(n_organs)}}
    return nib.Nifti1Image(ct.astype(np.int16), affine), nib.Nifti1Image(seg, affine), names


def test_png_is_a_valid_image(tmp_path):
    image, labels, names = abdomen()
    path = save_preview(image, labels, names, tmp_path / "preview.png")
    pixels = plt.imread(path)  # matplotlib's PNG reader, not the writer
    assert pixels.ndim == 3 and pixels.shape[2] in (3, 4) and min(pixels.shape[:2]) > 200
    assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.png"]  # no temporary left behind


def test_class_colours_are_distinct_and_saturated():
    """Twenty classes (the legend's own colours, as drawn): no two closer than MIN_DELTA_E, none
    grey-like. The old tab20 cycle had pairs ~10 apart and two greys."""
    image, labels, names = abdomen(n_organs=19)
    fig = render_preview(image, labels, names)
    try:
        handles = fig.legends[0].legend_handles
        colours = np.array([to_rgb(h.get_edgecolor()) for h in handles])
    finally:
        plt.close(fig)
    assert len(colours) == 20
    lab = srgb_to_lab(colours)
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    assert chroma.min() > MIN_CHROMA, chroma.round()
    closest = min(np.linalg.norm(lab[i] - lab[j]) for i, j in itertools.combinations(range(len(lab)), 2))
    assert closest > MIN_DELTA_E, closest


def test_axial_slice_goes_through_the_organs_not_the_big_class():
    image, labels, names = abdomen()
    seg = np.asarray(labels.dataobj)
    organ_z = np.flatnonzero(np.isin(seg, [1, 2, 3]).any(axis=(0, 1)))
    voxel_mean_z = np.argwhere(seg > 0).mean(axis=0)[2]
    assert not organ_z.min() <= voxel_mean_z <= organ_z.max()  # the old choice: the muscle's slices
    x, y, z = slice_centre(seg)
    assert organ_z.min() <= z <= organ_z.max()
    assert np.isin(seg[:, :, z], [1, 2, 3]).sum() > 50  # through the organs, not grazing one
    fig = render_preview(image, labels, names)
    try:
        axial_overlay = fig.axes[0].images[1].get_array()
        organ_colours = {tuple(np.round(to_rgb(h.get_edgecolor()), 3)) for h in fig.legends[0].legend_handles[:3]}
        drawn = {tuple(c) for c in np.round(np.asarray(axial_overlay)[..., :3].reshape(-1, 3), 3)}
        assert organ_colours <= drawn  # the axial panel shows every organ
        assert f"slice {z + 1}/" in fig.axes[0].get_title()
    finally:
        plt.close(fig)


@pytest.mark.parametrize("shape", [(48, 40, 60), (120, 40, 12), (30, 30, 140)])
def test_titles_and_legend_are_inside_the_canvas(shape):
    """Rendered (not saved with a tight box): every title, marker and the legend lie on the canvas."""
    image, labels, names = abdomen(n_organs=17, shape=shape)
    names = {k: (v + "_with_a_long_anatomical_name" if k % 2 else v) for k, v in names.items()}
    fig = render_preview(image, labels, names)
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        width, height = fig.canvas.get_width_height()
        artists = [ax.title for ax in fig.axes] + [t for ax in fig.axes for t in ax.texts] + list(fig.legends)
        assert len(fig.legends) == 1 and all(ax.get_title() for ax in fig.axes)
        for artist in artists:
            box = artist.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, (artist, box, width, height)
        legend_box = fig.legends[0].get_window_extent(renderer)
        for ax in fig.axes:  # the legend does not cover the pictures
            assert not legend_box.overlaps(ax.get_window_extent(renderer))
    finally:
        plt.close(fig)
