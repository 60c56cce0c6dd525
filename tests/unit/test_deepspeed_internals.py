"""The version check that guards every use of DeepSpeed's internals (train.deepspeed_internals)."""

import deepspeed
import pytest

from mosaicbert_ds.errors import UserError
from mosaicbert_ds.train.deepspeed_internals import check_version


def test_the_installed_deepspeed_is_a_tested_one():
    check_version()  # setup.cfg pins the tested releases
    check_version(deepspeed.__version__)


@pytest.mark.parametrize("version", ["0.20.0", "0.18.9", "1.0", "garbage"])
def test_an_untested_deepspeed_fails_with_one_line_naming_it(version):
    with pytest.raises(UserError) as err:
        check_version(version)
    message = str(err.value)
    assert f"DeepSpeed {version} is untested" in message and "0.19.x" in message
    assert "\n" not in message
