"""Built-in synthetic chest-CT + radiology-report dataset (numpy only, plus nibabel for writing).

Every case is a chest phantom in Hounsfield units with a matching radiology report whose findings sentences
each carry the voxel region they describe, so that sentence-to-region alignment can be learned and measured.

geometry.py  the voxel grid in mm: RAS+ affine and axis conventions (read before touching anatomy code)
anatomy.py   normal anatomy: ``ANATOMY_LABELS``, the per-case label map and its HU
findings.py  ``FINDINGS``: which ones a case has, and how each is drawn into the volume
reports.py   report wording: findings sentences with their regions, impression
case.py      ``generate_case``: the stages in order -> ``SyntheticCase`` (in memory)
testbed.py   the grounding testbed (``variant="testbed"``): large lesions of four looks the encoder can see
writer.py    ``write_dataset``: a dataset on disk in CT-RATE's layout (either variant)
cache.py     ``ensure_default_dataset`` / ``ensure_testbed_dataset``: the cached built-in datasets
cli.py       ``python -m simcrop.data.synthetic [--variant testbed]``

Two datasets: the realistic phantoms (the default; small findings, as in chest CT) and the grounding testbed
(large findings that differ by intensity and texture, for telling "cannot see" from "does not align").
"""

from simcrop.data.synthetic.anatomy import (AIR_HU, ANATOMY_IDS, ANATOMY_LABELS, BONE_LABELS, LEFT_LUNG_LABELS,
                                            LUNG_LABELS, RIGHT_LUNG_LABELS)
from simcrop.data.synthetic.cache import dataset_dirname, ensure_default_dataset, ensure_testbed_dataset
from simcrop.data.synthetic.case import (DEFAULT_SHAPE, DEFAULT_SPACING, HU_MAX, HU_MIN, PAPER_SHAPE, PAPER_SPACING,
                                         RESCALE_INTERCEPT, RESCALE_SLOPE, SyntheticCase, generate_case, region_mask)
from simcrop.data.synthetic.cli import main
from simcrop.data.synthetic.findings import CTRATE_LABELS, FINDING_TO_CTRATE, FINDINGS, LUNG_FINDINGS
from simcrop.data.synthetic.geometry import make_affine
from simcrop.data.synthetic.testbed import (TESTBED_CROP, TESTBED_N, TESTBED_SHAPE, TESTBED_SPACING, TESTBED_TYPES,
                                            TESTBED_VAL_FRACTION, generate_testbed_case)
from simcrop.data.synthetic.writer import (DEFAULT_N, DEFAULT_VAL_FRACTION, GENERATOR_VERSION, METADATA_COLUMNS,
                                           REPORT_COLUMNS, VARIANTS, is_valid_case, variant_defaults, write_dataset)

__all__ = [
    "AIR_HU", "ANATOMY_IDS", "ANATOMY_LABELS", "BONE_LABELS", "CTRATE_LABELS", "DEFAULT_N", "DEFAULT_SHAPE",
    "DEFAULT_SPACING", "DEFAULT_VAL_FRACTION", "FINDINGS", "FINDING_TO_CTRATE", "GENERATOR_VERSION", "HU_MAX",
    "HU_MIN", "LEFT_LUNG_LABELS", "LUNG_FINDINGS", "LUNG_LABELS", "METADATA_COLUMNS", "PAPER_SHAPE", "PAPER_SPACING",
    "REPORT_COLUMNS", "RESCALE_INTERCEPT", "RESCALE_SLOPE", "RIGHT_LUNG_LABELS", "SyntheticCase", "TESTBED_CROP",
    "TESTBED_N", "TESTBED_SHAPE", "TESTBED_SPACING", "TESTBED_TYPES", "TESTBED_VAL_FRACTION", "VARIANTS",
    "dataset_dirname", "ensure_default_dataset", "ensure_testbed_dataset", "generate_case", "generate_testbed_case",
    "is_valid_case", "main", "make_affine", "region_mask", "variant_defaults", "write_dataset",
]
