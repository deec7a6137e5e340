from __future__ import annotations

from hypothesis import given, strategies as st

from rawgate.signatures import mint_call_id, split_call_id


def test_plain_id_has_no_signature() -> None:
    cid = mint_call_id()
    assert cid.startswith("call_")
    assert split_call_id(cid) == (cid, None)
    assert split_call_id("toolu_123") == ("toolu_123", None)


@given(st.binary(min_size=1, max_size=300))
def test_signature_round_trip(raw: bytes) -> None:
    import base64

    sig = base64.b64encode(raw).decode()
    cid = mint_call_id(sig)
    assert all(c.isalnum() or c in "._-" for c in cid)
    assert split_call_id(cid) == (cid, sig)


def test_ids_are_unique() -> None:
    assert len({mint_call_id() for _ in range(1000)}) == 1000
