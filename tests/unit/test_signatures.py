from __future__ import annotations

from hypothesis import given, strategies as st

from rawgate.translate.signatures import mint_call_id, split_call_id


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


@given(
    st.dictionaries(st.text(max_size=40), st.text(min_size=1, max_size=200), max_size=8),
    st.none() | st.text(max_size=200),
)
def test_reasoning_round_trip(sigs: dict[str, str], text: str | None) -> None:
    from rawgate.translate.signatures import pack_reasoning, unpack_reasoning

    blob = pack_reasoning(sigs, text)
    assert blob.isascii()
    assert unpack_reasoning(blob) == sigs


@given(st.text(max_size=300))
def test_foreign_encrypted_content_yields_nothing(blob: str) -> None:
    from rawgate.translate.signatures import unpack_reasoning

    got = unpack_reasoning(blob)
    assert isinstance(got, dict)
    if not blob.startswith("rg1."):
        assert got == {}


def test_corrupt_reasoning_blobs() -> None:
    from rawgate.translate.signatures import unpack_reasoning

    for blob in ["rg1.", "rg1.!!!!", "rg1.bnVsbA", "rg1.W10", "rg1.eyJzIjogWzFdfQ", "gAAAAABo"]:
        assert unpack_reasoning(blob) == {}
