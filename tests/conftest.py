import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def hf_model_dir(request, tmp_path_factory):
    """(directory, transformers model) of a tiny random Qwen2.5-VL saved with save_pretrained."""
    from hf_fixtures import random_hf_model, tiny_config  # torch/transformers only for tests that need them

    model = random_hf_model(tiny_config(tie=request.param))
    path = tmp_path_factory.mktemp("hf_tied" if request.param else "hf_untied")
    model.save_pretrained(path)
    return path, model
