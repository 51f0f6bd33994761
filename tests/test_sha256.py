"""SHA-256 and HMAC of the signing path, on both implementations (CPU rounds and portable C)."""
import hashlib
import hmac
import os
import subprocess
import sys

import pytest

CHECK = r"""
import hashlib, hmac, os, random
from octo_core._codec import SHA256_HARDWARE, SigningKey, sha256_hex
rng = random.Random(7)
lengths = list(range(0, 200)) + [255, 256, 1000, 4096, 65537]
for n in lengths:
    data = bytes(rng.getrandbits(8) for _ in range(n))
    assert sha256_hex(data) == hashlib.sha256(data).hexdigest(), n
for key_length in (0, 1, 31, 32, 63, 64, 65, 200):
    key = bytes(rng.getrandbits(8) for _ in range(key_length))
    for n in (0, 55, 56, 64, 119, 120, 500):
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert SigningKey(key).digest(data) == hmac.new(key, data, "sha256").digest()
print("hardware" if SHA256_HARDWARE else "portable")
"""


@pytest.mark.parametrize("portable", ["0", "1"])
def test_sha256_and_hmac_equal_hashlib(portable):
    env = dict(os.environ, OCTO_SHA256_PORTABLE=portable)
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    if portable == "1":
        assert proc.stdout.strip() == "portable"   # the fallback really ran
    else:
        print("implementation used:", proc.stdout.strip())


def test_signature_is_hmac_of_the_protocol_string():
    from octo_core._codec import SigningKey
    fields = ("com.a", "com.b", "Echo", "echo", "1700000000000", "ab" * 16)
    expected = hmac.new(b"token", "\n".join(fields).encode(), hashlib.sha256).hexdigest()
    assert SigningKey("token").sign(*fields) == expected
