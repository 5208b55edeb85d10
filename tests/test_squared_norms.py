"""lightning_aquila.squared_norms: one pass over the gradients per optimizer step, shared by
whoever asks (the monitor's gradient norm, AquilaLM's clipping), and never a stale result."""

import torch

from lightning_aquila.squared_norms import squared_norms


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.randn(7, generator=g).bfloat16(),
            torch.randn(2, 2, generator=g)]


def _by_hand(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.double().square().sum() for t in tensors])


def test_each_tensors_sum_of_squares_in_the_order_given_across_dtypes():
    tensors = _tensors()
    got = squared_norms(tensors)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, _by_hand(tensors), rtol=1e-6, atol=0)


def test_a_second_call_for_the_same_tensors_in_the_same_state_reuses_the_result():
    tensors = _tensors()
    first = squared_norms(tensors)
    assert squared_norms(list(tensors)) is first


def test_an_in_place_change_to_one_tensor_computes_again():
    tensors = _tensors()
    before = squared_norms(tensors)
    tensors[2].mul_(2)  # as another micro-batch's gradient accumulating would
    after = squared_norms(tensors)
    assert after is not before
    torch.testing.assert_close(after, _by_hand(tensors), rtol=1e-6, atol=0)
    assert after[2].item() == 4 * before[2].item()


def test_other_tensors_with_the_same_shapes_are_computed_anew():
    """The next step's gradients are new tensors (the old ones freed, their ids free for
    reuse): only the very same objects match."""
    first = squared_norms(_tensors(seed=0))  # its tensors are freed at once
    second = _tensors(seed=1)
    got = squared_norms(second)
    assert got is not first
    torch.testing.assert_close(got, _by_hand(second), rtol=1e-6, atol=0)


def test_a_subset_or_another_order_is_computed_anew():
    tensors = _tensors()
    squared_norms(tensors)
    torch.testing.assert_close(squared_norms(tensors[::-1]), _by_hand(tensors[::-1]),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(squared_norms(tensors[:2]), _by_hand(tensors[:2]),
                               rtol=1e-6, atol=0)
