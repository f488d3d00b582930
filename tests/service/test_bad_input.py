"""Bad uploads and parameters get clear 4xx JSON errors in one shape; the server stays up."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.service.conftest import png_bytes, random_image

pytestmark = pytest.mark.timeout(120)


def huge_but_small_png(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels in a few KB (1-bit, all zero)."""
    buf = io.BytesIO()
    Image.new("1", (w, h)).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def assert_error(r, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body["error"]) >= {"code", "message"}
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]


def test_bad_inputs(app_client):
    good = png_bytes(random_image(0))
    gif = io.BytesIO()
    Image.fromarray(random_image(0)).save(gif, format="GIF")
    big = huge_but_small_png(3000, 3000)
    assert len(big) < 10_000
    with app_client(max_image_pixels=1_000_000, max_image_bytes=64 * 1024) as (client, _):
        post = client.post
        raw = {"content-type": "image/png"}
        assert_error(post("/inspect", content=b"", headers=raw), 400, "empty_body")
        assert_error(post("/inspect", content=b""), 400, "empty_body")
        assert_error(post("/inspect", content=b"this is text", headers=raw), 400, "not_an_image")
        assert_error(post("/inspect", content=good[: len(good) // 2], headers=raw), 400, "truncated_image")
        assert_error(
            post("/inspect", content=b"abc", headers={"content-type": "text/plain"}),
            415,
            "unsupported_media_type",
        )
        assert_error(
            post("/inspect", content=gif.getvalue(), headers={"content-type": "image/png"}),
            415,
            "unsupported_image_format",
        )
        assert_error(post("/inspect", content=big, headers=raw), 413, "image_too_large")
        too_many_bytes = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
        noisy = png_bytes(too_many_bytes)
        assert len(noisy) > 64 * 1024
        # One rule for bytes (issue 10, item 7): 413 payload_too_large with max_bytes =
        # ZSI_MAX_IMAGE_BYTES, raw or multipart, declared or streamed. image_too_large = pixels.
        over_bytes = [
            post("/inspect", content=noisy, headers=raw),
            # streamed without Content-Length: capped while reading
            post(
                "/inspect",
                content=iter([noisy[i : i + 4096] for i in range(0, len(noisy), 4096)]),
                headers=raw,
            ),
            # a body far over the cap is refused from Content-Length alone
            post("/inspect", content=b"x" * (2 * 1024 * 1024), headers=raw),
            post("/inspect", files={"image": ("a.png", noisy, "image/png")}),
        ]
        for r in over_bytes:
            assert_error(r, 413, "payload_too_large")
            assert r.json()["error"]["max_bytes"] == 64 * 1024
        assert_error(post("/inspect", files={"file": ("a.png", good, "image/png")}), 422, "missing_image")
        assert_error(
            post("/inspect?product=no-such-thing", content=good, headers=raw), 404, "unknown_product"
        )
        assert_error(post("/inspect?product=Bad%20Id", content=good, headers=raw), 404, "unknown_product")
        assert_error(post("/inspect?method=nonsense", content=good, headers=raw), 422, "unknown_method")
        assert_error(post("/inspect?output=gif", content=good, headers=raw), 422, "invalid_parameters")
        assert_error(client.get("/inspect"), 405, "method_not_allowed")
        assert_error(client.get("/nowhere"), 404, "not_found")
        # 1-pixel-high image
        assert_error(
            post("/inspect", content=png_bytes(random_image(1, 1, 30)), headers=raw), 400, "image_too_small"
        )
        # still healthy and still inspecting
        assert client.get("/health").json() == {"status": "ok"}
        assert post("/inspect", content=good, headers=raw).status_code == 200


def test_multipart_parser_refusals_are_json_4xx_not_500(app_client):
    """Two files in one /inspect upload, too many golden images, a body that is not multipart:
    Starlette's parser refuses them; each is a JSON 4xx with its own code, never a 500."""
    good = png_bytes(random_image(0))
    with app_client(max_reference_images=2) as (client, _):
        two = [("image", ("a.png", good, "image/png")), ("image", ("b.png", good, "image/png"))]
        r = client.post("/inspect", files=two)
        assert_error(r, 422, "too_many_images")
        assert r.json()["error"]["max_files"] == 1
        three = [("images", (f"{i}.png", good, "image/png")) for i in range(3)]
        r = client.post("/products/bottle/references", files=three)
        assert_error(r, 422, "too_many_images")
        assert "ZSI_MAX_REFERENCE_IMAGES" in r.json()["error"]["message"]
        broken = {"content-type": "multipart/form-data"}  # no boundary
        assert_error(
            client.post("/inspect", content=b"--x\r\nnot a part", headers=broken), 400, "invalid_multipart"
        )
        assert_error(
            client.post("/products/bottle/calibrate", content=b"junk", headers=broken),
            400,
            "invalid_multipart",
        )
        many_fields = {f"f{i}": "v" for i in range(20)}
        assert_error(
            client.post("/inspect", data=many_fields, files={"image": ("a.png", good, "image/png")}),
            400,
            "invalid_multipart",
        )
        assert client.get("/health").json() == {"status": "ok"}
        assert client.post("/inspect", files={"image": ("a.png", good, "image/png")}).status_code == 200


@pytest.mark.parametrize("ctype", ["image/png", "multipart/form-data; boundary=xyz"])
def test_a_client_hanging_up_mid_upload_is_a_refusal_not_a_server_error(ctype) -> None:
    import asyncio
    from types import SimpleNamespace

    from starlette.requests import Request

    from service.errors import ApiError
    from service.routers.inspect import read_upload

    messages = [
        {
            "type": "http.request",
            "body": b"--xyz\r\n" if "multipart" in ctype else b"\x89PNG",
            "more_body": True,
        },
        {"type": "http.disconnect"},
    ]

    async def receive() -> dict:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/inspect",
        "headers": [(b"content-type", ctype.encode())],
    }
    services = SimpleNamespace(settings=SimpleNamespace(max_image_bytes=1 << 20))
    with pytest.raises(ApiError) as err:
        asyncio.run(read_upload(Request(scope, receive), services))  # type: ignore[arg-type]
    assert (err.value.status, err.value.code) == (400, "client_disconnected")
