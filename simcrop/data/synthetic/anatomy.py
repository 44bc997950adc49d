"""Normal chest anatomy of a phantom: the label ids, per-case random parameters, the label map and its HU.

``anatomy`` (uint8) holds ``ANATOMY_LABELS`` ids: the normal anatomical compartment of each voxel. Air outside the
body is exactly ``AIR_HU``. Everything is drawn on canonical mm coordinates (geometry.py has the axes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simcrop.data.synthetic.geometry import Axes, draw_polyline_label, segment_sdf, smooth_noise, unit_vectors

AIR_HU = -1000.0

ANATOMY_LABELS: dict[int, str] = {
    0: "outside",
    1: "body",  # other soft tissue, fat, abdomen, neck, paraspinal muscles, spinal canal
    2: "right_upper_lobe",
    3: "right_middle_lobe",
    4: "right_lower_lobe",
    5: "left_upper_lobe",  # incl. lingula
    6: "left_lower_lobe",
    7: "heart",
    8: "mediastinum",  # incl. aorta
    9: "airway",  # air lumen of trachea, main and lobar bronchi
    10: "spine",
    11: "ribs",  # ribs and sternum
}
ANATOMY_IDS: dict[str, int] = {name: i for i, name in ANATOMY_LABELS.items()}
LUNG_LABELS: tuple[int, ...] = (2, 3, 4, 5, 6)
RIGHT_LUNG_LABELS: tuple[int, ...] = (2, 3, 4)
LEFT_LUNG_LABELS: tuple[int, ...] = (5, 6)
BONE_LABELS: tuple[int, ...] = (10, 11)


@dataclass
class AnatomyParams:
    """Per-case anatomy parameters, in canonical mm (world mm = canonical * scale + shift)."""

    scale_xy: float
    scale_z: float
    shift: np.ndarray  # (3,) mm
    body_ax: float  # body ellipse half-axes (x, y)
    body_ay: float
    fat: float  # subcutaneous fat thickness
    cav_ax: float  # thoracic cavity (inner rib cage) half-axes
    cav_ay: float
    z_apex: float  # lung apex height
    z_dome_r: float  # diaphragm dome tops (right higher, liver)
    z_dome_l: float
    z_fis_r: float  # oblique fissure height at y = 0 (right, left)
    z_fis_l: float
    z_hfis: float  # right horizontal fissure height
    heart_c: np.ndarray  # (3,) heart centre
    heart_ax: np.ndarray  # (3,) semi-axes: long (left-anterior), short (in-plane), z
    heart_angle: float  # radians, long axis rotated from -x toward +y
    rib_phase: float
    spine_phase: float
    vessels: list  # [(p0, p1, r0, r1)] in canonical mm


def sample_anatomy(rng: np.random.Generator) -> AnatomyParams:
    """Random body size, lung, heart and bone geometry and vessel trees (independent of the voxel grid)."""
    fat = rng.uniform(8.0, 20.0)
    body_ax = rng.uniform(140.0, 150.0)
    body_ay = rng.uniform(100.0, 110.0)
    a = AnatomyParams(
        scale_xy=rng.uniform(0.92, 1.0),
        scale_z=rng.uniform(0.9, 1.03),
        shift=np.array([rng.uniform(-6, 6), rng.uniform(-6, 6), rng.uniform(-10, 10)]),
        body_ax=body_ax,
        body_ay=body_ay,
        fat=fat,
        cav_ax=body_ax - fat - 16.0,
        cav_ay=body_ay - fat - 16.0,
        z_apex=rng.uniform(116.0, 128.0),
        z_dome_r=rng.uniform(-62.0, -48.0),
        z_dome_l=rng.uniform(-78.0, -64.0),
        z_fis_r=rng.uniform(-4.0, 8.0),
        z_fis_l=rng.uniform(0.0, 12.0),
        z_hfis=rng.uniform(14.0, 28.0),
        heart_c=np.array([rng.uniform(-27, -17), rng.uniform(15, 25), rng.uniform(-45, -35)]),
        heart_ax=np.array([rng.uniform(48, 56), rng.uniform(35, 41), rng.uniform(36, 44)]),
        heart_angle=math.radians(rng.uniform(32, 48)),
        rib_phase=rng.uniform(0, 26),
        spine_phase=rng.uniform(0, 28),
        vessels=[],
    )
    # Pulmonary vessel trees from each hilum: ~14 trunks per lung, each forking once (canonical mm).
    for sign, hilum in ((+1.0, np.array([45.0, 0.0, -10.0])), (-1.0, np.array([-45.0, 0.0, -12.0]))):
        for d in unit_vectors(rng, 14):
            d[0] = sign * (abs(d[0]) + 0.6)  # point laterally (toward this lung)
            d[2] *= 1.4  # lungs are tall
            d /= np.linalg.norm(d)
            length = rng.uniform(50, 100)
            mid = hilum + d * length * 0.6
            a.vessels.append((hilum, mid, 3.5, 2.2))
            for c in unit_vectors(rng, 2):
                cd = d + 0.6 * c
                cd /= np.linalg.norm(cd)
                a.vessels.append((mid, mid + cd * rng.uniform(0.4, 0.7) * length, 2.0, 0.9))
    return a


def build_anatomy(c: Axes, A: AnatomyParams, heart_factor: float):
    """Label map (uint8 [X, Y, Z]) and lung/soft-tissue helpers, drawn on canonical coordinates c."""
    x, y, z = c.x, c.y, c.z  # (X,1,1), (1,Y,1), (1,1,Z) canonical mm
    shape = c.shape
    lab = np.zeros(shape, np.uint8)

    # Body: elliptic cylinder along z.
    body2d = (x / A.body_ax) ** 2 + (y / A.body_ay) ** 2 <= 1.0  # (X, Y, 1)
    lab[np.broadcast_to(body2d, shape)] = 1

    # Thoracic cavity (inside the rib cage) and lung dome / diaphragm surfaces (X, Y, 1).
    cav2d = (x / A.cav_ax) ** 2 + (y / A.cav_ay) ** 2 <= 1.0
    xl = 0.5 * A.cav_ax  # lateral centre of each lung
    ax_ = np.abs(x)
    z_top = A.z_apex - 55.0 * ((ax_ - xl) / xl) ** 2 - 35.0 * (y / A.cav_ay) ** 2
    z_dome = np.where(x > 0, A.z_dome_r, A.z_dome_l)  # right (+x) dome higher
    z_bot = z_dome - 30.0 * ((ax_ - xl) / xl) ** 2 - 35.0 * ((y - 15.0) / A.cav_ay) ** 2
    thorax = cav2d & (z > z_bot) & (z < z_top)  # (X, Y, Z)

    # Mediastinum: central band from sternum to spine, between diaphragm and thoracic inlet.
    z_med_lo = min(A.z_dome_r, A.z_dome_l) - 15.0
    med = cav2d & (np.abs(x + 4.0) < 24.0) & (z > z_med_lo) & (z < A.z_apex - 25.0)
    # Paraspinal block (vertebral body, paraspinal soft tissue): never lung.
    y_vb, r_vb = -50.0, 17.0
    para2d = (np.abs(x) < 28.0) & (y < y_vb + 15.0)

    # Aorta (mediastinum label): ascending -> arch (left of the trachea) -> descending, left of the spine.
    aorta = np.zeros(shape, bool)
    pts = [(8, 18, -30), (8, 15, 38), (-5, 12, 52), (-20, 5, 56), (-28, -15, 52), (-30, -36, 40), (-30, -38, -110)]
    draw_polyline_label(c, pts, [14, 14, 13, 13, 12, 12, 12], aorta, True)

    # Heart: rotated ellipsoid, anterior-left, on the diaphragm; enlarged by heart_factor for cardiomegaly.
    ca, sa = math.cos(A.heart_angle), math.sin(A.heart_angle)
    hc = A.heart_c + np.array([-(heart_factor - 1.0) * 25.0, 0.0, 0.0])  # enlarged hearts grow to the left
    hax = A.heart_ax * np.array([heart_factor, 1.0 + (heart_factor - 1.0) * 0.7, 1.0 + (heart_factor - 1.0) * 0.6])
    dx, dy = x - hc[0], y - hc[1]
    u = -dx * ca + dy * sa  # along the long axis (toward left-anterior)
    v = dx * sa + dy * ca
    heart = ((u / hax[0]) ** 2 + (v / hax[1]) ** 2 + ((z - hc[2]) / hax[2]) ** 2 <= 1.0) & cav2d & ~para2d

    lab[med | aorta] = 8

    # Lungs and lobes.
    lung = thorax & ~med & ~para2d & ~aorta & ~heart
    right = x > 0  # (X, 1, 1): patient right = +x
    lower_r = z < A.z_fis_r - 0.8 * y  # oblique fissures: posterior-superior to anterior-inferior, (1, Y, Z)
    lower_l = z < A.z_fis_l - 0.8 * y
    upper_r = z >= A.z_hfis  # horizontal fissure (right only)
    lab[lung & right & ~lower_r & upper_r] = 2
    lab[lung & right & ~lower_r & ~upper_r] = 3
    lab[lung & right & lower_r] = 4
    lab[lung & ~right & ~lower_l] = 5
    lab[lung & ~right & lower_l] = 6
    lab[heart] = 7

    # Airway lumen: trachea down to the carina, main and lobar bronchi.
    airway = np.zeros(shape, bool)
    trachea = [(0, -15, 400), (0, -15, 25)]
    draw_polyline_label(c, trachea, [9, 9], airway, True)
    for branch, radii in (
        ([(0, -15, 25), (28, -18, 12), (50, -20, 0), (58, -18, -20)], [7, 6, 5.5, 5]),  # right main + intermedius
        ([(50, -20, 0), (70, -15, 35)], [4.5, 3.5]),  # right upper
        ([(58, -18, -20), (68, 25, -40)], [4, 3]),  # right middle
        ([(58, -18, -20), (70, -40, -70)], [4.5, 3.5]),  # right lower
        ([(0, -15, 25), (-35, -20, 5), (-55, -22, -10)], [7, 6, 5]),  # left main
        ([(-55, -22, -10), (-72, -5, 25)], [4.5, 3.5]),  # left upper
        ([(-55, -22, -10), (-68, -40, -70)], [4.5, 3.5]),  # left lower
    ):
        draw_polyline_label(c, branch, radii, airway, True)
    airway &= np.broadcast_to(body2d, shape)
    lab[airway] = 9

    # Spine: vertebral bodies (periodic in z, with discs), spinal canal, posterior elements.
    r_xy = np.sqrt(x**2 + (y - y_vb) ** 2)  # (X, Y, 1)
    phase = np.mod(z - A.spine_phase, 28.0)  # (1, 1, Z)
    disc = phase < 6.0
    vb = r_xy <= r_vb
    y_canal = y_vb - r_vb - 8.0
    r_canal = np.sqrt(x**2 + (y - y_canal) ** 2)
    post = (
        ((r_canal >= 7.0) & (r_canal <= 12.0) & (y < y_canal + 2.0))  # laminae
        | ((np.abs(x) < 4.0) & (y < y_canal - 8.0) & (y > y_canal - 20.0))  # spinous process
        | ((np.abs(x) > 9.0) & (np.abs(x) < 32.0) & (np.abs(y - y_canal - 2.0) < 5.0))  # transverse processes
    )
    spine = vb | (post & ~disc)
    lab[spine] = 10

    # Ribs: band just outside the cavity, periodic along u = z + 0.45 y (ribs descend anteriorly),
    # absent near the midline (spine behind, costal cartilage in front); sternum in front.
    band = ((x / (A.cav_ax + 2.0)) ** 2 + (y / (A.cav_ay + 2.0)) ** 2 > 1.0) & (
        (x / (A.cav_ax + 11.0)) ** 2 + (y / (A.cav_ay + 11.0)) ** 2 <= 1.0
    )
    band &= np.abs(x) >= 28.0
    rib_z = np.mod(z + 0.45 * y - A.rib_phase, 26.0) < 9.0  # (1, Y, Z)
    ribs = band & rib_z & (z < A.z_apex + 10.0) & (z > min(A.z_dome_r, A.z_dome_l) - 70.0)
    sternum = (np.abs(x) < 15.0) & (y > A.cav_ay - 2.0) & (y < A.cav_ay + 10.0)
    sternum = sternum & (z > A.heart_c[2] - 45.0) & (z < A.z_apex - 30.0)
    lab[ribs | sternum] = 11

    geo = {
        "body2d": body2d,
        "fat2d": body2d & ((x / (A.body_ax - A.fat)) ** 2 + (y / (A.body_ay - A.fat)) ** 2 > 1.0),
        "canal": (r_canal < 7.0) & np.broadcast_to(body2d, shape),
        "below_diaphragm": cav2d & (z <= z_bot),
        "vb_rim": vb & (r_xy > r_vb - 3.5),
        "disc": vb & disc,
        "sternum": sternum,
    }
    return lab, geo


def base_hu(lab: np.ndarray, geo: dict, c: Axes, rng: np.random.Generator) -> np.ndarray:
    """HU (float32 [X, Y, Z]) of the normal anatomy, before lesions and noise."""
    shape = lab.shape
    hu = np.full(shape, AIR_HU, np.float32)
    tex = smooth_noise(rng, c, 10.0)  # ~unit-std smooth texture
    body = lab == 1
    hu[body] = 40.0  # muscle / soft tissue
    hu[np.broadcast_to(geo["fat2d"], shape) & body] = -100.0  # subcutaneous fat
    hu[geo["below_diaphragm"] & body & (c.x > -20.0)] = 58.0  # liver
    hu[geo["canal"] & body] = 15.0  # CSF
    hu[body] += 6.0 * tex[body]
    hu[lab == 8] = 38.0 + 4.0 * tex[lab == 8]  # mediastinum / aorta (non-contrast)
    hu[lab == 7] = 40.0 + 3.0 * tex[lab == 7]  # heart
    hu[lab == 9] = AIR_HU  # airway lumen
    lung = (lab >= 2) & (lab <= 6)
    # Lungs: ~-855 HU, denser posteriorly (dependent, supine), mild texture.
    hu[lung] = (-855.0 - 0.35 * np.broadcast_to(c.y, shape) + 15.0 * tex)[lung]
    spine = lab == 10
    hu[spine] = 500.0  # posterior elements
    hu[spine & geo["vb_rim"]] = 650.0  # cortical rim
    hu[spine & np.broadcast_to(c.x**2 + (c.y + 50.0) ** 2 <= (17.0 - 3.5) ** 2, shape)] = 320.0  # cancellous bone
    hu[spine & geo["disc"]] = 85.0  # intervertebral discs
    hu[lab == 11] = 560.0
    hu[(lab == 11) & geo["sternum"]] = 380.0
    return hu


def draw_vessels(hu: np.ndarray, lab: np.ndarray, c: Axes, A: AnatomyParams, soft_mm: float) -> None:
    """Blend pulmonary vessels (~40 HU tapered tubes, soft edges) into lung voxels."""
    for p0, p1, r0, r1 in A.vessels:
        res = segment_sdf(c, p0, p1, r0, r1)
        if res is None:
            continue
        sl, sdf = res
        w = np.clip(sdf / soft_mm + 0.5, 0.0, 1.0) * 0.85
        w *= (lab[sl] >= 2) & (lab[sl] <= 6)
        sub = hu[sl]
        sub += w * (40.0 - sub)
