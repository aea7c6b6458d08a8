"""Samples for each detector: positives (real formats, fake values: (text, the part that must not
survive masking)) and look-alikes that must not fire. Fake values are assembled from pieces so
that no scanner of this repository mistakes the file for a leak."""

from __future__ import annotations

_A = "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8S9t0U1v2W3x4Y5z6"  # 52 letters and digits, no meaning
AWS_ID = "AKIA" + "IOSFODNN7EXAMPLE"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9" + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0"
       + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c")
ANTHROPIC = "sk-ant-" + "api03-" + (_A * 2)[:93] + "AA"
OPENAI = "sk-" + "proj-" + (_A * 2)[:64]
PEM = ("-----BEGIN RSA PRIVATE KEY-----\nMIIEowIBAAKCAQEA" + _A + "\n" + _A + "==\n"
       "-----END RSA PRIVATE KEY-----")
OPENSSH = ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ" + _A
           + "\n-----END OPENSSH PRIVATE KEY-----")

POSITIVE = {
    "secrets": [
        (f"my key is {AWS_ID} ok", AWS_ID),
        (f"aws_secret_access_key = {AWS_SECRET}", AWS_SECRET),
        (f'export AWS_SECRET_ACCESS_KEY="{AWS_SECRET}"', AWS_SECRET),
        ("token ghp_" + _A[:36], "ghp_" + _A[:36]),
        ("github_pat_" + (_A * 2)[:82], "github_pat_" + (_A * 2)[:82]),
        ("GITLAB_TOKEN=glpat-" + _A[:20], "glpat-" + _A[:20]),
        ("xoxb-" + "123456789012-1234567890123-" + _A[:24], _A[:24]),
        ("https://hooks.slack.com/services/" + "T0123ABCD/B0123ABCD/" + _A[:24], _A[:24]),
        ("STRIPE=sk_" + "live_" + _A[:24], "sk_live_" + _A[:24]),
        ("rk_" + "test_" + _A[:30], "rk_test_" + _A[:30]),
        (f"OPENAI_API_KEY={OPENAI}", OPENAI),
        ("sk-" + _A[:20] + "T3Blbk" + "FJ" + _A[20:40], "T3BlbkFJ" + _A[20:40]),
        (f"ANTHROPIC_API_KEY={ANTHROPIC}", ANTHROPIC),
        ("key=AIza" + _A[:35], "AIza" + _A[:35]),
        (f"Authorization: Bearer {JWT}", JWT),
        ("DATABASE_URL=postgres://app:" + "s3cr3t-Pw@db.internal:5432/prod", "s3cr3t-Pw"),
        ("mysql://root:" + "hunter2xx@10.0.0.5/app", "hunter2xx"),
        ("redis://:" + "supersecret@cache:6379/0", "supersecret"),
        ("https://admin:" + "Passw0rd!@example.com/path", "Passw0rd!"),
        ("Server=tcp:db.example.com,1433;Database=app;User ID=sa;Password=" + "Str0ngPa55;", "Str0ngPa55"),
        ("host=db.internal port=5432 user=app password=" + "s3cretpw dbname=prod", "s3cretpw"),
    ],
    "private_keys": [
        (f"here:\n{PEM}\nthanks", "MIIEowIBAAKCAQEA" + _A),
        (OPENSSH, "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ"),
        ("-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASC" + _A + "\n" + _A, _A),  # cut off
        ("-----BEGIN EC PRIVATE KEY-----\\nMHcCAQEEI" + _A + "\\n-----END EC PRIVATE KEY-----", _A),  # in JSON
    ],
    "credit_cards": [
        ("card 4111 1111 1111 1111 exp 12/29", "4111 1111 1111 1111"),
        ("5555-5555-5555-4444", "5555-5555-5555-4444"),
        ("amex 378282246310005.", "378282246310005"),
        ("6011111111111117", "6011111111111117"),
        ("visa: 4012888888881881", "4012888888881881"),
        ("jcb 3530111333300000", "3530111333300000"),
        ("mc2 2223003122003222", "2223003122003222"),
    ],
    "iban": [
        ("IBAN: GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
        ("DE89370400440532013000", "DE89370400440532013000"),
        ("pay to FR1420041010050500013M02606 today", "FR1420041010050500013M02606"),
        ("NL91ABNA0417164300", "NL91ABNA0417164300"),
    ],
    "phones": [
        ("call +44 20 7946 0958", "+44 20 7946 0958"),
        ("Tel. +33 1 23 45 67 89", "+33 1 23 45 67 89"),
        ("office (650) 253-0000", "(650) 253-0000"),
        ("cell 650-253-0000.", "650-253-0000"),
        ("+49 30 901820", "+49 30 901820"),
        ("+81 3-1234-5678", "+81 3-1234-5678"),
    ],
    "emails": [
        ("write to alice@example.com please", "alice@example.com"),
        ("bob.smith+tag@mail.co.uk", "bob.smith+tag@mail.co.uk"),
        ("<first_last@sub.domain.io>", "first_last@sub.domain.io"),
        ("mailto:x.y@corp.org", "x.y@corp.org"),
    ],
}

NEGATIVE = {
    "secrets": [
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        "commit 3b18e512dba79e4c8300dd08aeb37f8e728b8dad",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "AKIAIOSFODNN7EXAMPL is too short",
        "ghp_short token",
        "the virtual key sk-demo-alice and sk-...456",
        "postgres://localhost:5432/db and postgres://app@db/x",
        "postgres://user:${DB_PASSWORD}@host/db and https://user:****@host/",
        "https://example.com:8080/path?x=1",
        "eyJhbGciOi is not a whole token; eyJfoo.eyJbar.baz neither",
        "eyJub3RfYV9qd3QiOjF9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV",
        "pk_live_" + _A[:24] + " is a publishable key",
        "version v1.2.3, build 2024.01.15",
        "mode reverse:http://127.0.0.1:1@127.0.0.1",
        "base64 " + _A[:40] + " with no name",
    ],
    "private_keys": [
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA" + _A + "\n-----END PUBLIC KEY-----",
        "-----BEGIN CERTIFICATE-----\nMIIDdzCCAl+gAwIBAgIEAgAAuTANBgkqhkiG9w0BAQUFADBa\n-----END CERTIFICATE-----",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ" + _A + " user@host",
        "look for BEGIN PRIVATE KEY in the file",
    ],
    "credit_cards": [
        "4111 1111 1111 1112 fails Luhn",
        "1234 5678 9012 3456",
        "timestamp 1700000000000",
        "order 98765432101234",
        "ISBN 978-3-16-148410-0",
        "date 2024-01-15 at 192.168.100.200",
        "version 4.1.1.1111111111",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
        "0000 0000 0000 0000",
        "4111-1111 1111-1111 mixed separators",
    ],
    "iban": [
        "GB82 WEST 1234 5698 7654 33 has a bad checksum",
        "DE00123456789012345678",
        "US12345678901234",
        "AB12CDEF34567890ABCD",
        "SHA AB12 3456 7890",
    ],
    "phones": [
        "date 2024-01-15",
        "ip 192.168.1.1",
        "v1.2.3",
        "order 1234567890",
        "time 12:30:45",
        "ISBN 978-3-16-148410-0",
        "+1 alone",
        "+0 123 456",
        "port 8080 and pid 12345",
        "uuid 123e4567-e89b-12d3-a456-426614174000",
    ],
    "emails": [
        "npm i @anthropic-ai/claude-code@2.0.1",
        "pip install pkg@1.2.3",
        "user@localhost",
        "cc @mention",
        "foo@bar",
        "@media screen and (max-width: 600px)",
        "@property\ndef x(self): ...",
        "postgresql://gw@db.internal:5432/llm",
    ],
}
