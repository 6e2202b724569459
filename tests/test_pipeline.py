"""The diffusers pipeline of a trained model: call, batch-independent seeds, save/load with diffusers, bad input."""
import pytest
import torch

from ldm_paper.experiment import train_family
from ldm_paper.pipeline import FamilyPipeline, pipeline_from_run
from ldm_paper.sampling import make_scheduler


@pytest.fixture(scope="module")
def pipe():
    return pipeline_from_run(train_family("ci", progress=False)[16], "ci")


def test_call_returns_pil_images(pipe):
    out = pipe("a photo of a bag", num_inference_steps=8)
    assert len(out.images) == 1 and out.images[0].size == (32, 32)


def test_roundtrip_through_diffusers_from_pretrained(pipe, tmp_path):
    ref = pipe(["a photo of a bag", "a photo of a shirt"], num_inference_steps=4, output_type="pt").images
    pipe.save_pretrained(tmp_path / "p")
    assert (tmp_path / "p" / "model_index.json").exists()
    again = FamilyPipeline.from_pretrained(tmp_path / "p")            # diffusers' own from_pretrained, inherited
    assert type(again.text_encoder).__name__ == "CaptionEncoder"
    got = again("a photo of a shirt", num_inference_steps=4, output_type="pt", seed=0).images
    one = pipe("a photo of a shirt", num_inference_steps=4, output_type="pt").images
    assert torch.allclose(got, one, atol=1e-5)
    assert not torch.allclose(ref[1:], one, atol=1e-3)       # image index 1 has another seed than index 0


def test_sampler_follows_the_scheduler(pipe):
    a = pipe("a photo of a bag", num_inference_steps=4, output_type="pt").images
    pipe.scheduler = make_scheduler("ddpm")
    b = pipe("a photo of a bag", num_inference_steps=4, output_type="pt").images
    pipe.scheduler = make_scheduler("ddim")
    assert not torch.allclose(a, b, atol=1e-3)


def test_bad_output_type(pipe):
    with pytest.raises(ValueError, match="output_type='np'"):
        pipe("a photo of a bag", output_type="np")
