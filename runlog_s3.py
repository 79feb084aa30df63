"""runlog_s3: a run log store for magnus (0.4, 0.5) and runnable that keeps each run's log in Amazon S3.

One module, one job: magnus records every run in a JSON *run log*; this stores it in S3 (or any
S3-compatible server) so that many processes on many hosts can write to it without losing a write.
Every update is a compare-and-swap on the object's ETag (S3 conditional writes).

It needs nothing but botocore at run time (to sign requests and to send them), so it can be
`pip install`ed or copied as this one file into a container or job where only botocore is present.
magnus or runnable is used when importable; the command line (`python -m runlog_s3`) works without.

Sections, each using only the ones above it: errors, config, credentials, S3 client, run log
documents, the s3 layout, the chunked-s3 layout (its protocol written out above ChunkedS3RunLogs),
framework stores (shared, without a framework, magnus 0.4, pydantic stores, magnus 0.5, runnable),
command line (reading and writing runs; the life of runs; prune; export and import; check; check
--local; serve; the parser and main; register; messages and the console script).

License: Apache-2.0.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import random
import re
import sys
import threading
import time
import unicodedata
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections import Counter
from dataclasses import dataclass, fields
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    Callable,
    ClassVar,
    Dict,
    FrozenSet,
    Iterator,
    List,
    Mapping,
    NamedTuple,
    NoReturn,
    Optional,
    Tuple,
    Type,
    Union,
    cast,
)

__version__ = "0.1.0"

logger = logging.getLogger("runlog_s3")


def log_level_from(environ: Mapping[str, str]) -> int:
    """The level of this module's logs: RUNLOG_S3_LOG_LEVEL, else WARNING. magnus 0.4 sends the root
    logger's DEBUG to stdout, so a store that logs at its root's level floods every run."""
    name = (environ.get("RUNLOG_S3_LOG_LEVEL") or "WARNING").strip().upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        raise ValueError(f"RUNLOG_S3_LOG_LEVEL {name!r} is not a log level: use DEBUG, INFO, WARNING or ERROR")
    return level


try:
    logger.setLevel(log_level_from(os.environ))
except ValueError:
    logger.setLevel(logging.WARNING)  # the command line says so; a pipeline must not fail on it


# Errors ###########################################################################################


class RunlogS3Error(Exception):
    """Base of every error this module raises; the message is one line that says what to do.

    .may_have_landed: the operation that failed may have written something all the same (a reply lost,
    a 5xx, a timeout after a PUT was sent, or a first write of several that did land): its outcome is
    unknown, never "nothing written".
    """

    may_have_landed = False

    def __init__(self, message: str):
        # Not super(): when combined with magnus's exceptions, theirs would replace the message.
        Exception.__init__(self, message)
        self.message = message  # magnus's own exceptions carry .message; keep the same attribute

    def say_may_have_landed(self) -> None:
        """Mark this error as one after which a write may have landed, and say so in its message."""
        if self.may_have_landed:
            return
        self.may_have_landed = True
        if "; nothing written" in self.message:
            self.message = self.message.replace("; nothing written", "; what it wrote before may have landed")
        elif "may have been written" not in self.message:
            self.message += "; what it wrote before this failure may have landed"
        self.args = (self.message,)


class ConfigError(RunlogS3Error, ValueError):
    """The run_log_store config (or a command-line option standing for it) is not valid."""


class CredentialsError(RunlogS3Error):
    """AWS credentials could not be found, read or assumed."""


class S3Error(RunlogS3Error):
    """An S3 (or STS) request failed; carries the S3 error code, HTTP status, bucket, key, request id."""

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        code: str = "",
        status: int = 0,
        bucket: str = "",
        key: str = "",
        request_id: str = "",
    ):
        super().__init__(message)
        self.operation = operation
        self.code = code
        self.status = status
        self.bucket = bucket
        self.key = key
        self.request_id = request_id


class NotFoundError(S3Error):
    """The object (404 NoSuchKey) or the bucket (404 NoSuchBucket) does not exist."""


class NoSuchBucketError(NotFoundError):
    """The bucket does not exist."""


class PreconditionFailedError(S3Error):
    """A conditional write was refused (412 PreconditionFailed): the object is not as the condition said."""

    after_lost_reply = False  # an earlier attempt of the same request may have landed: it may be ours


class WrongRegionError(S3Error):
    """The bucket lives in another region than the configured one; .bucket_region names it."""

    def __init__(self, message: str, *, bucket_region: str = "", **kwargs: Any):
        super().__init__(message, **kwargs)
        self.bucket_region = bucket_region


class InvalidRunIdError(RunlogS3Error, ValueError):
    """A run id that cannot be a key of its own (empty, '/', '..', control characters, too long)."""


class InvalidRunLogError(RunlogS3Error):
    """An object in the bucket, or a document handed in, is not a run log."""


class RunLogNotFoundError(RunlogS3Error, LookupError):
    """No run log is stored for the run id. .removed: rm's marker stands where it was (it was deleted)."""

    removed = False


class RunLogExistsError(RunlogS3Error):
    """A run log is already stored for the run id."""


class LogNotFoundError(RunlogS3Error, LookupError):
    """A step or branch named by its internal name is not in the run log; .kind says which is missing."""

    kind = "step"

    def __init__(self, message: str, kind: str = "step"):
        super().__init__(message)
        self.kind = kind


class ConflictError(RunlogS3Error):
    """Other writers kept changing the run log until the conflict deadline passed."""


# Config ###########################################################################################

# Buckets S3 accepts today: 3-63 characters of lowercase letters, digits, dots and hyphens,
# beginning and ending with a letter or digit, and not shaped like an IP address.
_BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IP_ADDRESS = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_REGION_NAME = re.compile(r"^[a-z]{2}(-[a-z0-9]+)+-\d+$")
_SERVER_SIDE_ENCRYPTION = ("", "AES256", "aws:kms", "aws:kms:dsse")


@dataclass(frozen=True)
class Config:
    """The magnus `run_log_store.config` block of the old S3 store, key for key, plus additions.

    It holds names of environment variables and of files, never a secret.
    """

    s3_bucket: str
    prefix: str = ""
    region: str = "eu-west-1"
    aws_profile: str = ""  # '' means botocore's default chain, not a profile named ''
    use_credentials: bool = False
    aws_credentials_file: str = "~/.aws/credentials"
    aws_access_key_name: str = "AWS_ACCESS_KEY_ID"
    aws_secret_access_key_name: str = "AWS_SECRET_ACCESS_KEY"
    aws_session_key_name: str = "AWS_SESSION_TOKEN"
    role_arn: str = ""
    session_duration_in_seconds: int = 900
    # Additions: none is needed by a user who copies the documented block.
    endpoint_url: str = ""  # '' -> AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL, then AWS itself
    max_attempts: int = 8
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    conflict_timeout: float = 120.0  # how long one update may keep losing the compare-and-swap
    role_session_name: str = "runlog-s3"
    server_side_encryption: str = ""
    sse_kms_key_id: str = ""
    expected_bucket_owner: str = ""
    ca_bundle: str = ""  # '' -> AWS_CA_BUNDLE, then the system's certificates

    @classmethod
    def from_dict(cls, values: Optional[Mapping[str, Any]]) -> Config:
        """Validate a config block: unknown keys, wrong types and bad values are one ConfigError."""
        values = dict(values or {})
        known = {f.name: f for f in fields(cls)}
        check_config_keys(values)
        # A key written with no value in YAML (`prefix:`) means "the default".
        values = {name: value for name, value in values.items() if value is not None}
        if not values.get("s3_bucket"):
            raise ConfigError("run_log_store.config needs s3_bucket: the name of the bucket to keep run logs in")
        for name, value in values.items():
            _check_type(name, value, str(known[name].type))
        config = cls(**values)
        config._check_values()
        return config

    def _check_values(self) -> None:
        bucket = self.s3_bucket
        if not _BUCKET_NAME.match(bucket) or ".." in bucket or _IP_ADDRESS.match(bucket):
            raise ConfigError(
                f"s3_bucket {bucket!r} is not a valid S3 bucket name: use 3-63 lowercase letters, digits, "
                "dots and hyphens, starting and ending with a letter or digit"
            )
        if not _REGION_NAME.match(self.region):
            raise ConfigError(f"region {self.region!r} is not an AWS region name such as eu-west-1")
        segments = self.prefix.strip("/").split("/")
        if self.prefix.strip("/") and any(s in ("", ".", "..") or _has_control_characters(s) for s in segments):
            raise ConfigError(
                f"prefix {self.prefix!r} has an empty, '.' or '..' segment or a control character; "
                "use a plain path such as 'runs/magnus'"
            )
        if self.endpoint_url:
            check_endpoint_url(self.endpoint_url, "endpoint_url")
        if not 900 <= self.session_duration_in_seconds <= 43200:
            raise ConfigError(
                f"session_duration_in_seconds must be between 900 and 43200 (what STS allows), "
                f"not {self.session_duration_in_seconds}"
            )
        if not 1 <= self.max_attempts <= 50:
            raise ConfigError(f"max_attempts must be between 1 and 50, not {self.max_attempts}")
        for name in ("connect_timeout", "read_timeout", "conflict_timeout"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be a number of seconds above 0, not {getattr(self, name)}")
        if self.server_side_encryption not in _SERVER_SIDE_ENCRYPTION:
            raise ConfigError(
                f"server_side_encryption {self.server_side_encryption!r} is not one of "
                f"{', '.join(repr(v) for v in _SERVER_SIDE_ENCRYPTION)}"
            )
        if self.sse_kms_key_id and not self.server_side_encryption.startswith("aws:kms"):
            raise ConfigError("sse_kms_key_id needs server_side_encryption: aws:kms (or aws:kms:dsse)")
        if self.role_arn and not self.role_arn.startswith("arn:"):
            raise ConfigError(f"role_arn {self.role_arn!r} is not an ARN such as arn:aws:iam::123456789012:role/name")

    @property
    def key_prefix(self) -> str:
        """The prefix with its slashes stripped: keys are `<key_prefix>/<run_id>.json`."""
        return self.prefix.strip("/")


def check_config_keys(values: Mapping[str, Any]) -> None:
    """ConfigError naming the first key that is not one of the config block's."""
    known = [f.name for f in fields(Config)]
    unknown = sorted(set(values) - set(known))
    secrets = [name for name in unknown if name in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")]
    if secrets:
        # runnable's minio stores take keys in their config; a config file is no place for a secret.
        raise ConfigError(
            f"{secrets[0]} in run_log_store.config: this store never reads a secret from its config; set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or name other variables with aws_access_key_name and "
            "use_credentials: true), or use aws_profile"
        )
    if unknown:
        import difflib

        close = difflib.get_close_matches(str(unknown[0]), known, n=1)
        guess = f" (did you mean {close[0]}?)" if close else ""
        raise ConfigError(f"unknown key {unknown[0]!r} in run_log_store.config{guess}; valid keys: {', '.join(known)}")


def _check_type(name: str, value: Any, annotation: str) -> None:
    # Annotations are strings (from __future__ import annotations); bool is not an int here.
    expected = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float)}[annotation]
    if (isinstance(value, bool) and annotation != "bool") or not isinstance(value, expected):
        kind = {"str": "a string", "bool": "true or false", "int": "a whole number", "float": "a number"}[annotation]
        raise ConfigError(f"run_log_store.config key {name!r} must be {kind}, not {type(value).__name__} {value!r}")


def _has_control_characters(text: str) -> bool:
    return any(unicodedata.category(ch) == "Cc" for ch in text)


def check_endpoint_url(url: str, where: str) -> str:
    """Return the endpoint URL without a trailing slash, or raise ConfigError naming `where`."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where} {url!r} must be a URL with a scheme, such as https://s3.example.com:9000")
    if parts.query or parts.fragment:
        raise ConfigError(f"{where} {url!r} must not have a query or fragment")
    return url.rstrip("/")


def resolve_endpoint_url(config: Config, environ: Mapping[str, str], service: str = "s3") -> str:
    """The endpoint for a service: config, then AWS_ENDPOINT_URL_<SERVICE>, then AWS_ENDPOINT_URL, else ''."""
    if service == "s3" and config.endpoint_url:
        return check_endpoint_url(config.endpoint_url, "endpoint_url")
    for variable in (f"AWS_ENDPOINT_URL_{service.upper()}", "AWS_ENDPOINT_URL"):
        if environ.get(variable):
            return check_endpoint_url(environ[variable], variable)
    return ""


# Credentials ######################################################################################


_stripped_noted: set = set()  # (field, source) pairs whose white space was removed and logged

# The clock correction of this process, in seconds (server time minus ours): learnt from a reply's Date
# header when a server refuses a request as skewed, kept for every later request (S3 client section).
_clock_offset = {"seconds": 0.0}
MAX_CLOCK_CORRECTION = 24 * 3600.0  # a server Date further off than this is not a clock to sign with


def wall_clock() -> float:
    """The time requests are signed with, and assumed-role expiry is judged on: this machine's clock plus
    the learnt correction."""
    return time.time() + _clock_offset["seconds"]


@dataclass(frozen=True)
class Credentials:
    """One set of AWS credentials and where they came from; repr never shows the secret or token."""

    access_key: str
    secret_key: str
    token: str = ""
    expiry: Optional[float] = None  # seconds since the epoch; None for credentials that do not expire
    source: str = ""

    def __post_init__(self) -> None:
        # A value written with `echo` into a Kubernetes Secret ends in a newline; sent as a header it
        # would fail in the HTTP library with the whole value in the message. Strip the ends; refuse
        # anything else that cannot be in a key, before any request.
        for name, what in (("access_key", "access key id"), ("secret_key", "secret key"), ("token", "session token")):
            value = getattr(self, name)
            clean = value.strip()
            if any(not (" " < ch < "\x7f") for ch in clean):
                raise CredentialsError(
                    f"the {what} from {self.source or 'the credentials'} holds white space or control characters; "
                    "write the value again without them (e.g. printf instead of echo)"
                )
            if clean != value:
                if (what, self.source) not in _stripped_noted:  # the chain hands out credentials per request
                    _stripped_noted.add((what, self.source))
                    logger.info("removed white space around the %s from %s", what, self.source or "the credentials")
                object.__setattr__(self, name, clean)

    def __repr__(self) -> str:
        return (
            f"Credentials(access_key={mask_access_key(self.access_key)!r}, secret_key='***', "
            f"token={'***' if self.token else ''!r}, expiry={self.expiry!r}, source={self.source!r})"
        )


def secret_forms(secret: str) -> FrozenSet[str]:
    """The ways a secret can be written into text: as it is (and stripped), percent-encoded as Python's quote
    and quote_plus do with any of their usual safe sets, in upper or lower hex, and each of those JSON-escaped
    or as bytes' repr. Shorter than 4 characters, none (masking would hit ordinary words)."""
    quote, quote_plus = urllib.parse.quote, urllib.parse.quote_plus
    encoded = {secret, secret.strip(), quote(secret, safe=""), quote(secret), quote(secret, safe="/:=&?"),
               quote_plus(secret), quote_plus(secret, safe="/")}
    encoded |= {re.sub(r"%[0-9A-F]{2}", lambda found: found.group(0).lower(), form) for form in encoded}
    forms = set()
    for form in encoded:
        forms |= {form, json.dumps(form)[1:-1], json.dumps(form, ensure_ascii=False)[1:-1], repr(form.encode())[2:-1]}
    return frozenset(form for form in forms if len(form) >= 4)


# A secret is masked where it stands as a value: not inside a longer word (the secret "local" leaves the bucket
# runlog-s3-local as it is), so letters, digits and . _ - may not touch it on either side.
_NOT_IN_A_WORD = (r"(?<![A-Za-z0-9._-])", r"(?![A-Za-z0-9._-])")


@functools.lru_cache(maxsize=16)
def _secret_pattern(secrets: Tuple[str, ...], binary: bool) -> Any:
    forms = sorted({form for secret in secrets if secret for form in secret_forms(secret)}, key=len, reverse=True)
    if not forms:
        return None
    if binary:
        alternatives = b"|".join(re.escape(form.encode()) for form in forms)
        return re.compile(_NOT_IN_A_WORD[0].encode() + b"(?:" + alternatives + b")" + _NOT_IN_A_WORD[1].encode())
    return re.compile(_NOT_IN_A_WORD[0] + "(?:" + "|".join(re.escape(form) for form in forms) + ")" + _NOT_IN_A_WORD[1])


def mask_secrets(text: str, secrets: Any) -> str:
    """The text with every value of `secrets` masked (***), in any of its forms (secret_forms)."""
    pattern = _secret_pattern(tuple(secrets), False)
    return pattern.sub("***", text) if pattern is not None else text


def mask_access_key(access_key: str) -> str:
    """The last four characters of an access key id, enough to tell keys apart in a log."""
    return "..." + access_key[-4:] if len(access_key) > 4 else "***"


_VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def variable_label(name: str, key: str) -> str:
    """An environment variable's name for a message, unless it does not look like one: a secret put into
    a *_name key by mistake is never echoed."""
    mixed = any(c.islower() for c in name) and any(c.isupper() for c in name) and any(c.isdigit() for c in name)
    if _VARIABLE_NAME.match(name) and not (mixed and len(name) >= 16):
        return name
    return f"(the one {key} names: not shown, as it does not look like a variable name; is it a secret?)"


def read_env_credentials(config: Config, environ: Mapping[str, str]) -> Credentials:
    """use_credentials: true -> the environment variables *named by* the three *_name keys."""
    keys = ("aws_access_key_name", "aws_secret_access_key_name")
    names = (config.aws_access_key_name, config.aws_secret_access_key_name)
    labels = [variable_label(name, key) for name, key in zip(names, keys)]
    for name, key, label in zip(names, keys, labels):
        if not environ.get(name):
            raise CredentialsError(
                f"use_credentials is true but environment variable {label} is not set; set it, or put the name "
                f"of the variable that holds it in {key}"
            )
    return Credentials(
        access_key=environ[names[0]],
        secret_key=environ[names[1]],
        token=environ.get(config.aws_session_key_name, ""),
        source=f"environment variables {labels[0]}, {labels[1]}",
    )


# botocore's names for where its chain found credentials, in words for messages.
_BOTOCORE_METHODS = {
    "env": "environment variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY",
    "shared-credentials-file": "shared credentials file",
    "config-file": "AWS config file",
    "assume-role": "role assumed from the AWS config file",
    "sso": "AWS IAM Identity Center (SSO)",
    "container-role": "container credentials",
    "iam-role": "instance metadata (IAM role)",
    "custom-process": "credential_process",
    "assume-role-with-web-identity": "web identity token",
}


class _BotocoreChain:
    """botocore's default credential chain, honouring aws_profile and aws_credentials_file."""

    def __init__(self, config: Config):
        import botocore.exceptions
        import botocore.session

        credentials_file = os.path.expanduser(config.aws_credentials_file)
        # An empty profile means "no profile": the old store passed '' on and botocore raised ProfileNotFound.
        session = botocore.session.Session(profile=config.aws_profile or None)
        session.set_config_variable("credentials_file", credentials_file)
        where = f"profile {config.aws_profile!r}" if config.aws_profile else "the default credential chain"
        try:
            self._credentials = session.get_credentials()
        except botocore.exceptions.ProfileNotFound as exc:
            raise CredentialsError(
                f"AWS profile {config.aws_profile!r} is in neither {credentials_file} nor the AWS config file; "
                "fix aws_profile or aws_credentials_file, or leave aws_profile empty for the default chain"
            ) from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise CredentialsError(f"reading AWS credentials from {where}: {exc}") from exc
        if self._credentials is None:
            raise CredentialsError(
                f"no AWS credentials found in {where} (environment, {credentials_file}, AWS config, "
                "container or instance metadata); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                "name a profile with aws_profile, or set use_credentials: true"
            )
        method = getattr(self._credentials, "method", "") or "unknown"
        self.source = f"{where}: {_BOTOCORE_METHODS.get(method, method)}"

    def get(self) -> Credentials:
        # botocore refreshes its own refreshable credentials (SSO, process, metadata) here.
        frozen = self._credentials.get_frozen_credentials()
        return Credentials(frozen.access_key, frozen.secret_key, frozen.token or "", None, self.source)


class CredentialProvider:
    """Hands out current credentials: from named variables or botocore's chain, then AssumeRole if asked.

    Assumed-role credentials are refreshed before they expire, because pipelines run for hours.
    """

    def __init__(
        self,
        config: Config,
        *,
        environ: Optional[Mapping[str, str]] = None,
        clock: Optional[Callable[[], float]] = None,
        transport: Optional[Transport] = None,
    ):
        self._config = config
        self._environ = os.environ if environ is None else environ
        # STS's Expiration is the server's time: judged on the corrected clock, a clock that runs ahead
        # does not assume the role again before every request.
        self._clock = clock or wall_clock
        self._transport = transport
        self._base: Optional[Callable[[], Credentials]] = None
        self._last_base: Optional[Credentials] = None
        self._assumed: Optional[Credentials] = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"CredentialProvider(source={self.source!r})"

    @property
    def source(self) -> str:
        """Where credentials come from, for messages: never the credentials themselves."""
        config = self._config
        if config.use_credentials:
            base = (f"environment variables {variable_label(config.aws_access_key_name, 'aws_access_key_name')}, "
                    f"{variable_label(config.aws_secret_access_key_name, 'aws_secret_access_key_name')}")
        elif config.aws_profile:
            base = f"profile {config.aws_profile!r} in {config.aws_credentials_file}"
        else:
            base = "the default credential chain"
        return f"role {config.role_arn} assumed with {base}" if config.role_arn else base

    def get(self) -> Credentials:
        """Current credentials; assumes the role again when its credentials are close to expiry."""
        with self._fresh_lock():
            base = self._base_credentials()
            if not self._config.role_arn:
                return base
            if self._assumed is None or self._expires_soon(self._assumed):
                self._assumed = assume_role(base, self._config, self._sts_transport(), self._environ)
            return self._assumed

    def secrets(self) -> List[str]:
        """The secret keys and tokens this provider hands out (read on first use, as a request would): what
        must never be stored."""
        self.get()
        held = [self._last_base, self._assumed]
        return [value for credentials in held if credentials is not None
                for value in (credentials.secret_key, credentials.token) if value]

    def refresh(self) -> Credentials:
        """Forget cached credentials (after an ExpiredToken reply) and read or assume them anew."""
        with self._fresh_lock():
            # Every source is read again: named variables, the environment fast path, botocore's chain.
            self._assumed = None
            self._base = None
        return self.get()

    def _fresh_lock(self) -> threading.Lock:
        if self._pid != os.getpid():  # a forked child must not inherit a lock held by a parent thread
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def _base_credentials(self) -> Credentials:
        if self._base is None:
            if self._config.use_credentials:
                credentials = read_env_credentials(self._config, self._environ)
                self._base = lambda: credentials
            elif self._chain_starts_with_environment():
                # botocore's chain would take these first; reading them here spares the command line
                # the 90 ms import of botocore.session.
                credentials = Credentials(
                    self._environ["AWS_ACCESS_KEY_ID"],
                    self._environ["AWS_SECRET_ACCESS_KEY"],
                    self._environ.get("AWS_SESSION_TOKEN") or self._environ.get("AWS_SECURITY_TOKEN", ""),
                    source="the default credential chain: " + _BOTOCORE_METHODS["env"],
                )
                self._base = lambda: credentials
            else:
                self._base = _BotocoreChain(self._config).get
        self._last_base = self._base()
        return self._last_base

    def _chain_starts_with_environment(self) -> bool:
        # With a profile named (in config or AWS_PROFILE), botocore skips environment credentials.
        environ = self._environ
        named_profile = self._config.aws_profile or environ.get("AWS_PROFILE") or environ.get("AWS_DEFAULT_PROFILE")
        return not named_profile and bool(environ.get("AWS_ACCESS_KEY_ID")) and bool(environ.get("AWS_SECRET_ACCESS_KEY"))

    def _expires_soon(self, credentials: Credentials) -> bool:
        # Refresh with a third of the session (at most 5 minutes) left, so no request carries a token
        # that expires in flight.
        margin = min(300.0, self._config.session_duration_in_seconds / 3)
        return credentials.expiry is not None and credentials.expiry - self._clock() < margin

    def _sts_transport(self) -> Transport:
        if self._transport is None:
            sts_url = sts_endpoint_url(self._config, self._environ)
            self._transport = BotocoreTransport(self._config, self._environ, sts_url)
        return self._transport


def sts_endpoint_url(config: Config, environ: Mapping[str, str]) -> str:
    """AWS_ENDPOINT_URL_STS, then AWS_ENDPOINT_URL, else the regional STS endpoint."""
    endpoint = resolve_endpoint_url(config, environ, service="sts")
    if endpoint:
        return endpoint
    return f"https://sts.{config.region}.{_aws_domain(config.region)}"


def _sts_request(
    action: str,
    params: Mapping[str, str],
    credentials: Credentials,
    config: Config,
    transport: Transport,
    environ: Mapping[str, str],
    sleep: Callable[[float], None] = time.sleep,
) -> ElementTree.Element:
    """One signed STS query-API call, retried as S3 requests are; the parsed XML reply, or S3Error."""
    body = urllib.parse.urlencode({"Action": action, "Version": "2011-06-15", **params}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    url = sts_endpoint_url(config, environ) + "/"
    skew_corrected = False
    for attempt in range(1, config.max_attempts + 1):
        request = sign_request("POST", url, headers, body, credentials, config.region, "sts")
        last = attempt == config.max_attempts
        try:
            reply = transport.send(request)
        except _transport_errors() as exc:
            failure = classify_transport_error(exc)
            if failure.retry and not last:
                sleep(retry_delay(attempt))
                continue
            detail = redact(f"{type(exc).__name__}: {_first_line(exc)}", credentials)
            raise S3Error(
                f"STS {action} at {url} failed{f' after {attempt} attempts' if attempt > 1 else ''}: {failure.what} "
                f"({detail}); {failure.check}",
                operation=action, code="ConnectionError",
            ) from None
        if reply.status == 200:
            try:
                return _parse_xml(reply.body)
            except ElementTree.ParseError:
                if not last:  # a 200 cut short: the reply was lost, not refused
                    sleep(retry_delay(attempt))
                    continue
                raise S3Error(f"STS {action} at {url} failed: its reply is not complete XML",
                              operation=action) from None
        error = _error_from_reply(reply, operation=f"STS {action}", bucket="", key="")
        if _is_clock_skew(error, reply):
            if not skew_corrected and not last and _correct_clock(reply):
                skew_corrected = True
                continue
            raise _clock_skew_error(error, reply, url)
        if (error.status in _RETRYABLE_STATUS or error.code in _RETRYABLE_CODES) and not last:
            sleep(retry_delay(attempt))
            continue
        raise error
    raise AssertionError("unreachable: the last attempt returns or raises")


def assume_role(
    base: Credentials, config: Config, transport: Transport, environ: Mapping[str, str]
) -> Credentials:
    """STS AssumeRole with DurationSeconds = session_duration_in_seconds."""
    params = {
        "RoleArn": config.role_arn,
        "RoleSessionName": config.role_session_name,
        "DurationSeconds": str(config.session_duration_in_seconds),
    }
    try:
        root = _sts_request("AssumeRole", params, base, config, transport, environ)
    except S3Error as exc:
        raise CredentialsError(f"assuming role {config.role_arn} with {base.source}: {exc}") from exc
    found = {_local_name(e.tag): (e.text or "") for e in root.iter()}
    try:
        expiry = _parse_iso_time(found["Expiration"])
        return Credentials(
            found["AccessKeyId"],
            found["SecretAccessKey"],
            found["SessionToken"],
            expiry,
            f"role {config.role_arn} assumed with {base.source}",
        )
    except (KeyError, ValueError) as exc:
        raise CredentialsError(f"assuming role {config.role_arn}: STS reply lacks credentials ({exc})") from exc


def get_caller_identity(credentials: Credentials, config: Config, transport: Transport, environ: Mapping[str, str]) -> str:
    """The ARN STS reports for these credentials."""
    root = _sts_request("GetCallerIdentity", {}, credentials, config, transport, environ)
    return next((e.text or "" for e in root.iter() if _local_name(e.tag) == "Arn"), "")


def _parse_iso_time(text: str) -> float:
    from datetime import datetime, timezone

    text = text.strip().replace("Z", "+00:00")
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.timestamp()


# S3 client ########################################################################################

_RETRYABLE_STATUS = frozenset({500, 502, 503, 504})
# 409 ConditionalRequestConflict: a concurrent write to the key was in flight; S3 says to retry.
_RETRYABLE_CODES = frozenset({
    "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling", "ThrottlingException",
    "RequestThrottled", "ConditionalRequestConflict",
})
_EXPIRED_CODES = frozenset({"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"})
_BACKOFF_BASE = 0.1  # seconds; the wait after attempt n is jittered over base * 2**(n-1), capped
_BACKOFF_CAP = 10.0
_METADATA_HEADER = "x-amz-meta-"


class HttpReply(NamedTuple):
    """What came back: status, headers (looked up case-insensitively), body."""

    status: int
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str:
        for key, value in self.headers.items():
            if key.lower() == name.lower():
                return value
        return ""


class ObjectInfo(NamedTuple):
    """One object: key, size, ETag, last-modified (ISO 8601 as S3 gives it); as a run of the chunked
    layout, the count of its objects and their total size."""

    key: str
    size: int = 0
    etag: str = ""
    last_modified: str = ""
    objects: int = 1
    metadata: Mapping[str, str] = MappingProxyType({})  # from a HEAD: the x-amz-meta-* headers, without the prefix


class S3Object(NamedTuple):
    """An object's body with its ETag, as read by one GET."""

    key: str
    body: bytes
    etag: str
    last_modified: str = ""
    metadata: Mapping[str, str] = MappingProxyType({})  # the x-amz-meta-* headers, without the prefix


class ShortReplyError(OSError):
    """A reply whose body ended before its Content-Length: the connection dropped mid-reply."""


class TransportFailure(NamedTuple):
    """What a transport exception means: whether a retry can help, whether the request may have reached
    the server (so a PUT may have landed), and in words for the message."""

    retry: bool
    what: str
    check: str
    may_have_arrived: bool = True
    code: str = "ConnectionError"


def _transport_errors() -> Tuple[Type[BaseException], ...]:
    """Everything botocore's HTTP session (or a test transport) raises for a request that got no reply."""
    import botocore.exceptions

    return (botocore.exceptions.HTTPClientError, botocore.exceptions.ConnectionError, OSError, ValueError)


def classify_transport_error(exc: BaseException) -> TransportFailure:
    """The one table of transport failures: retried where the request may not have arrived or its reply
    was lost; fatal where no retry can help (an untrusted certificate, an invalid URL or header)."""
    import socket

    import botocore.exceptions as errors

    cause = getattr(exc, "kwargs", {}).get("error") or exc.__cause__ or exc.__context__
    text = f"{exc} {cause or ''}"
    if isinstance(exc, errors.SSLError) or "SSL" in type(exc).__name__ or "CERTIFICATE_VERIFY_FAILED" in text:
        if "CERTIFICATE_VERIFY_FAILED" in text or "certificate verify failed" in text or "hostname" in text.lower():
            return TransportFailure(False, "its TLS certificate is not trusted",
                                    "set ca_bundle in run_log_store.config (or AWS_CA_BUNDLE) to the CA that signed it",
                                    may_have_arrived=False, code="SSLError")
        # Handshake or record layer: an SSL error can also come while the reply is read, after the request
        # was applied, so it may have arrived.
        return TransportFailure(True, "the TLS connection failed", "check the endpoint and any proxy in between")
    if isinstance(exc, errors.ProxyConnectionError):
        # urllib3 1.26 (botocore's on Python < 3.10) calls any socket error through a proxy a proxy error,
        # a reset while the reply is read included: the request may have arrived.
        return TransportFailure(True, "the proxy failed", "check HTTPS_PROXY / NO_PROXY and the proxy")
    if isinstance(exc, errors.ConnectTimeoutError):
        return TransportFailure(True, "the connection timed out",
                                "check the endpoint and the network, or connect_timeout",
                                may_have_arrived=False)
    if isinstance(exc, errors.ReadTimeoutError):
        return TransportFailure(True, "no reply came within read_timeout", "check the endpoint, or raise read_timeout")
    if isinstance(exc, errors.EndpointConnectionError):
        if isinstance(cause, socket.gaierror) or "Name or service not known" in text or "getaddrinfo" in text:
            if getattr(cause, "errno", None) == socket.EAI_AGAIN or "Temporary failure" in text:
                return TransportFailure(True, "its name did not resolve (temporary DNS failure)", "check DNS",
                                        may_have_arrived=False)
            return TransportFailure(False, "its host name is unknown", "check endpoint_url and region",
                                    may_have_arrived=False)
        return TransportFailure(True, "the connection was refused",
                                "check that the endpoint is up and endpoint_url is right",
                                may_have_arrived=False)
    if isinstance(exc, (errors.ConnectionClosedError, ShortReplyError, ConnectionError, errors.ResponseStreamingError)):
        return TransportFailure(True, "the connection closed before a whole reply came",
                                "check the endpoint and the network")
    location_errors = ("LocationParseError", "LocationValueError", "InvalidURL", "InvalidHeader", "InvalidSchema")
    if isinstance(exc, ValueError) or type(cause).__name__ in location_errors or isinstance(cause, ValueError):
        return TransportFailure(False, "the request is not valid HTTP (a bad URL or header value)",
                                "check endpoint_url and the credentials' values", may_have_arrived=False)
    if isinstance(exc, (errors.HTTPClientError, OSError)):
        return TransportFailure(True, "the connection failed", "check the endpoint and the network")
    return TransportFailure(False, "the request failed", "run with --debug")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


class Transport:
    """The seam between the client and the network: send a signed, prepared request, get an HttpReply."""

    def send(self, request: Any) -> HttpReply:  # request: botocore.awsrequest.AWSPreparedRequest
        raise NotImplementedError


class BotocoreTransport(Transport):
    """botocore's own HTTP session: one connection pool for the client's life, proxies, TLS verified."""

    def __init__(self, config: Config, environ: Mapping[str, str], endpoint_url: str = ""):
        self._config = config
        self._environ = environ
        self._endpoint_url = endpoint_url  # the URL whose proxy settings apply (HTTPS_PROXY, NO_PROXY)
        self._session: Any = None
        self._pid = 0

    def _http_session(self) -> Any:
        # A child forked by magnus's parallel mode must never reuse a socket its parent opened.
        if self._session is None or self._pid != os.getpid():
            import socket

            import botocore.httpsession
            import botocore.utils

            verify: Any = self._config.ca_bundle or self._environ.get("AWS_CA_BUNDLE") or True
            self._session = botocore.httpsession.URLLib3Session(
                verify=verify,
                proxies=botocore.utils.get_environ_proxies(self._endpoint_url) if self._endpoint_url else {},
                timeout=(self._config.connect_timeout, self._config.read_timeout),
                max_pool_connections=16,
                # As botocore's clients do: without it a PUT's body waits for the ACK of its headers,
                # which the server delays (Nagle with delayed ACK): 40 ms added to every PUT.
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            )
            self._pid = os.getpid()
        return self._session

    def send(self, request: Any) -> HttpReply:
        with _OurRequest():
            reply = self._http_session().send(request)
        body = reply.content
        # botocore's session does not enforce Content-Length; a reply cut short is a lost reply.
        expected = reply.headers.get("Content-Length", "")
        if request.method != "HEAD" and expected.isdigit() and int(expected) != len(body):
            raise ShortReplyError(f"reply body ended after {len(body)} of {expected} bytes")
        return HttpReply(reply.status_code, dict(reply.headers), body)


_in_our_request = threading.local()  # set while this module signs or sends: see _quiet_our_requests
_QUIETED_LOGGERS = ("botocore.auth", "urllib3.connectionpool", "urllib3.connection", "botocore.httpsession")


def _quiet_our_requests(record: logging.LogRecord) -> bool:
    # botocore logs the canonical request at DEBUG, and it holds the x-amz-security-token header: never.
    if str(record.msg).startswith(("CanonicalRequest", "StringToSign", "Signature")):
        return False
    # Its other DEBUG lines and urllib3's, a few per request of ours, only when our own debug output is
    # on (RUNLOG_S3_LOG_LEVEL=DEBUG, or -vv): the same loggers' lines for other code pass as they are.
    return not (record.levelno <= logging.DEBUG and getattr(_in_our_request, "active", False)
                and not logger.isEnabledFor(logging.DEBUG))


for _name in _QUIETED_LOGGERS:  # once, at import: loggers exist before the libraries that use them
    logging.getLogger(_name).addFilter(_quiet_our_requests)


class _OurRequest:
    """Marks this thread as inside one of our requests, for _quiet_our_requests."""

    def __enter__(self) -> None:
        self.outer = getattr(_in_our_request, "active", False)
        _in_our_request.active = True

    def __exit__(self, *exc_info: Any) -> None:
        _in_our_request.active = self.outer


class _SignerCredentials:
    """What botocore's signer reads (botocore.credentials would cost 10 ms of import); repr masks it."""

    __slots__ = ("access_key", "secret_key", "token")

    def __init__(self, access_key: str, secret_key: str, token: Optional[str]):
        self.access_key, self.secret_key, self.token = access_key, secret_key, token

    def __repr__(self) -> str:
        return f"_SignerCredentials(access_key={mask_access_key(self.access_key)!r}, secret_key='***', token='***')"

    __str__ = __repr__

    def get_frozen_credentials(self) -> _SignerCredentials:
        return self


_signer_classes: Dict[str, type] = {}


def _signer_class(service: str) -> type:
    # botocore's signers read the clock themselves; these set the signing time from wall_clock().
    if not _signer_classes:
        from datetime import datetime, timezone

        from botocore.auth import SIGV4_TIMESTAMP, S3SigV4Auth, SigV4Auth

        def at_wall_clock(base: type) -> type:
            class Signer(base):
                def _modify_request_before_signing(self, request: Any) -> None:
                    now = datetime.fromtimestamp(wall_clock(), timezone.utc)
                    request.context["timestamp"] = now.strftime(SIGV4_TIMESTAMP)
                    super()._modify_request_before_signing(request)

            return Signer

        _signer_classes.update(s3=at_wall_clock(S3SigV4Auth), other=at_wall_clock(SigV4Auth))
    return _signer_classes["s3" if service == "s3" else "other"]


def sign_request(
    method: str, url: str, headers: Mapping[str, str], body: bytes, credentials: Credentials, region: str, service: str
) -> Any:
    """A SigV4-signed, prepared request; for S3 the signature covers the SHA-256 of the real body."""
    from botocore.awsrequest import AWSRequest

    request = AWSRequest(method=method, url=url, headers=dict(headers), data=body)
    signer = _signer_class(service)(
        _SignerCredentials(credentials.access_key, credentials.secret_key, credentials.token or None), service, region
    )
    with _OurRequest():
        signer.add_auth(request)
    return request.prepare()


def quote_key(key: str) -> str:
    """A key as a URL path: every byte but unreserved ones and '/' percent-encoded (space, +, =, unicode)."""
    return urllib.parse.quote(key, safe="/~")


def _quote_query(params: Mapping[str, str]) -> str:
    # Sorted and encoded the way SigV4 canonicalises them, so the signed and the sent query agree.
    return "&".join(
        f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}" for k, v in sorted(params.items())
    )


def _aws_domain(region: str) -> str:
    return "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"


def _local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _parse_xml(body: bytes) -> ElementTree.Element:
    return ElementTree.fromstring(body)


def _xml_fields(body: bytes) -> Dict[str, str]:
    """Top-level fields of an S3/STS error document, or {} when the body is not XML."""
    if not body or not body.lstrip().startswith(b"<"):
        return {}
    try:
        root = _parse_xml(body)
    except ElementTree.ParseError:
        return {}
    found: Dict[str, str] = {}
    for element in root.iter():
        found.setdefault(_local_name(element.tag), (element.text or "").strip())
    return found


_STATUS_CODES = {301: "PermanentRedirect", 403: "AccessDenied", 404: "NotFound", 412: "PreconditionFailed"}

_ACCESS_HINTS = {
    "GET": "the credentials need s3:GetObject on the key, and s3:ListBucket on the bucket so that a "
    "missing run log reads as not found instead of access denied",
    "HEAD": "the credentials need s3:GetObject on the key and s3:ListBucket on the bucket",
    "PUT": "the credentials need s3:PutObject on the key (and kms:GenerateDataKey when server-side "
    "encryption uses KMS)",
    "DELETE": "the credentials need s3:DeleteObject on the key",
    "LIST": "the credentials need s3:ListBucket on the bucket",
}


_POLICY_HINT = ("the bucket policy may require conditional writes (s3:if-none-match / s3:if-match), and this {method} "
                "carried no If-None-Match or If-Match")


def _error_from_reply(
    reply: HttpReply, *, operation: str, bucket: str, key: str, region: str = "", method: str = "",
    unconditional_write: bool = False,
) -> S3Error:
    """Turn a non-2xx reply into the S3Error subclass a caller can catch, with a one-line message.
    unconditional_write: the request was a PUT or DELETE of an object without If-Match or If-None-Match,
    which a bucket policy requiring conditional writes refuses with AccessDenied."""
    fields_ = _xml_fields(reply.body)
    code = fields_.get("Code") or _STATUS_CODES.get(reply.status, "")
    detail = fields_.get("Message", "")
    if not fields_.get("Code") and reply.body:  # a proxy's HTML page, a truncated document...
        snippet = reply.body[:120].decode("utf-8", "replace").replace("\n", " ")
        detail = f"unparseable reply: {snippet!r}"
    request_id = fields_.get("RequestId") or reply.header("x-amz-request-id")
    where = f"s3://{bucket}/{key}" if bucket else ""
    status = f"{code} (HTTP {reply.status})" if code else f"HTTP {reply.status}"
    base = f"{operation} {where}".strip() + f" failed: {status}"
    if detail:
        base += f": {detail}"
    kwargs: Dict[str, Any] = dict(operation=operation, code=code, status=reply.status, bucket=bucket, key=key,
                                  request_id=request_id)
    tail = f" [request id {request_id}]" if request_id else ""

    bucket_region = reply.header("x-amz-bucket-region") or fields_.get("Region", "")
    if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraintException") or (
        reply.status == 301
    ):
        if bucket_region and bucket_region != region:
            return WrongRegionError(
                f"bucket {bucket!r} is in region {bucket_region}, not {region}: set region: {bucket_region} "
                f"in run_log_store.config{tail}",
                bucket_region=bucket_region,
                **kwargs,
            )
    if reply.status == 404 and reply.body and not fields_.get("Code"):
        # S3 answers a 404 with an XML error (a HEAD with none): this page is another server's (a web
        # server, a proxy, endpoint_url with a path), not "no such key".
        return S3Error(f"{base}; this is not an S3 server's reply: is endpoint_url an S3 server?{tail}", **kwargs)
    if code == "NoSuchBucket" or (reply.status == 404 and not key and method != "GET"):
        return NoSuchBucketError(f"{base}; check s3_bucket (and endpoint_url, region){tail}", **kwargs)
    if reply.status == 404:
        return NotFoundError(f"{base}{tail}", **kwargs)
    if reply.status == 412:
        return PreconditionFailedError(f"{base}{tail}", **kwargs)
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return S3Error(f"{base}; check the access key and secret{tail}", **kwargs)
    if reply.status == 403:
        # Some servers (SeaweedFS among them), and every HEAD (a reply without a body), answer a
        # signature made with a wrong secret with a bare 403 / AccessDenied: name both causes.
        hint = _ACCESS_HINTS.get(method or operation.split()[0], "the credentials need permission for this")
        policy = _POLICY_HINT.format(method=method or operation) + "; " if (
            unconditional_write and code == "AccessDenied") else ""
        return S3Error(f"{base}; {policy}check the access key and secret (a wrong secret can look like this), or "
                       f"{hint}{tail}", **kwargs)
    return S3Error(f"{base}{tail}", **kwargs)


def _bare_etag(etag: str) -> str:
    etag = etag.strip()
    return (etag[2:] if etag.startswith("W/") else etag).strip('"')


class S3Client:
    """A minimal S3 client for one bucket: GET, PUT (conditional), HEAD, DELETE, ListObjectsV2.

    Signed with botocore's SigV4 signer, sent through a Transport (botocore's HTTP session in
    production), retried with full-jitter exponential backoff on faults that a retry can fix.
    """

    def __init__(
        self,
        config: Config,
        credentials: Optional[CredentialProvider] = None,
        transport: Optional[Transport] = None,
        *,
        environ: Optional[Mapping[str, str]] = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config = config
        self.bucket = config.s3_bucket
        self._environ = os.environ if environ is None else environ
        self.endpoint_url = resolve_endpoint_url(config, self._environ)
        self.credentials = credentials or CredentialProvider(config, environ=self._environ)
        self._sleep = sleep
        self.on_retry: Optional[Callable[[str, int, float], None]] = None  # (message, attempt, delay): the CLI's notices
        self._base_url, self._path_prefix = self._addressing()
        self.transport = transport or BotocoreTransport(config, self._environ, self._base_url)
        self._last_date = ("", 0.0, 0.0)  # the Date of the last reply; when it came, wall and monotonic clocks
        # PUTs and DELETEs that landed or may have (a reply lost, a 5xx): an operation that fails after
        # this moved says its outcome is unknown (S3RunLogs._writing).
        self.writes_landed = 0
        self.round_trip = 0.0  # seconds, smoothed over the replies this client got (0 before the first)
        self._count_lock = threading.Lock()
        self._conditional_delete: Optional[ConditionalDelete] = None  # found out by the first conditional_delete()
        self.said_unconditional_delete = False  # whether DELETE honours If-Match has been found out and said
        self.delete_condition_refused = False  # the server answered If-Match on DELETE with 501 or 400
        self._probe_lock_pid, self._probe_lock_held = os.getpid(), threading.Lock()

    def __repr__(self) -> str:
        return f"S3Client(bucket={self.bucket!r}, region={self.config.region!r}, endpoint={self._base_url!r})"

    def _addressing(self) -> Tuple[str, str]:
        """(base URL, path prefix): path-style on a custom endpoint or a dotted bucket, else virtual-hosted."""
        if self.endpoint_url:
            return self.endpoint_url, "/" + self.bucket
        domain = _aws_domain(self.config.region)
        if "." in self.bucket:  # a dotted bucket does not match the wildcard TLS certificate
            return f"https://s3.{self.config.region}.{domain}", "/" + self.bucket
        return f"https://{self.bucket}.s3.{self.config.region}.{domain}", ""

    def object_url(self, key: str, query: Optional[Mapping[str, str]] = None) -> str:
        """The URL of a key (or of the bucket when key is '')."""
        url = f"{self._base_url}{self._path_prefix}/{quote_key(key)}"
        return f"{url}?{_quote_query(query)}" if query else url

    # The five operations.

    def get_object(self, key: str) -> S3Object:
        """GET: the body and its ETag. Raises NotFoundError when there is no such key."""
        reply = self._request("GET", key)
        return S3Object(key, reply.body, reply.header("ETag"), reply.header("Last-Modified"), _metadata_of(reply))

    def put_object(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str = "",
        if_none_match: bool = False,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> str:
        """PUT, optionally only if the ETag matches or only if no object exists; returns the new ETag."""
        return self.put_reply(key, body, if_match=if_match, if_none_match=if_none_match, metadata=metadata).header("ETag")

    def put_reply(
        self,
        key: str,
        body: bytes,
        *,
        if_match: str = "",
        if_none_match: bool = False,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> HttpReply:
        """put_object's reply (its Date is the server's clock after the object landed)."""
        headers = self.put_headers(if_match=if_match, if_none_match=if_none_match, metadata=metadata)
        return self._request("PUT", key, headers=headers, body=body)

    def put_headers(
        self, *, if_match: str = "", if_none_match: bool = False, metadata: Optional[Mapping[str, str]] = None
    ) -> Dict[str, str]:
        """The headers of a PUT of a run log object: content type, condition, metadata, encryption."""
        headers = {"Content-Type": "application/json"}
        for name, value in (metadata or {}).items():
            headers[_METADATA_HEADER + name] = value
        if if_match:
            # Quoted and strong whatever form it came in (a LIST may give it unquoted, a proxy mark it weak):
            # S3 compares If-Match strongly.
            headers["If-Match"] = f'"{_bare_etag(if_match)}"'
        if if_none_match:
            headers["If-None-Match"] = "*"
        if self.config.server_side_encryption:
            headers["x-amz-server-side-encryption"] = self.config.server_side_encryption
        if self.config.sse_kms_key_id:
            headers["x-amz-server-side-encryption-aws-kms-key-id"] = self.config.sse_kms_key_id
        return headers

    def head_object(self, key: str) -> ObjectInfo:
        """HEAD: size, ETag, last-modified and metadata without the body."""
        reply = self._request("HEAD", key)
        size = int(reply.header("Content-Length") or 0)
        return ObjectInfo(key, size, reply.header("ETag"), reply.header("Last-Modified"), metadata=_metadata_of(reply))

    def delete_object(self, key: str, if_match: str = "") -> None:
        """DELETE, only if the ETag still matches when if_match is given (PreconditionFailedError otherwise;
        S3 answers 204 whether or not an unconditional DELETE's key existed; a server may ignore the
        condition: conditional_delete())."""
        self._request("DELETE", key, headers={"If-Match": f'"{_bare_etag(if_match)}"'} if if_match else None)

    def list_objects(self, prefix: str = "", delimiter: str = "", pages: Optional[List[int]] = None
                     ) -> Iterator[ObjectInfo]:
        """ListObjectsV2 over every page; with a delimiter, common prefixes come as keys ending in it. A list
        given as `pages` gets a 1 appended per page (a listing of several pages is not one moment)."""
        token = ""
        seen_tokens = set()
        while True:
            if pages is not None:
                pages.append(1)
            query = {"list-type": "2", "prefix": prefix}
            if delimiter:
                query["delimiter"] = delimiter
            if token:
                query["continuation-token"] = token
            reply = self._request("GET", "", query=query, operation="LIST")
            try:
                root = _parse_xml(reply.body)
            except ElementTree.ParseError as exc:
                raise S3Error(
                    f"LIST s3://{self.bucket}/{prefix}: the server's reply is not XML ({exc})", operation="LIST"
                ) from exc
            for element in root:
                name = _local_name(element.tag)
                if name == "Contents":
                    values = {_local_name(child.tag): child.text or "" for child in element}
                    yield ObjectInfo(
                        values.get("Key", ""),
                        int(values.get("Size") or 0),
                        values.get("ETag", ""),
                        values.get("LastModified", ""),
                    )
                elif name == "CommonPrefixes":
                    for child in element:
                        yield ObjectInfo(child.text or "")
            values = {_local_name(element.tag): element.text or "" for element in root}
            token = values.get("NextContinuationToken", "")
            if values.get("IsTruncated") != "true" or not token:
                return
            if token in seen_tokens:  # a server (or proxy) that repeats itself would list forever
                raise S3Error(
                    f"LIST s3://{self.bucket}/{prefix} failed: the server sent continuation token {token[:40]!r} "
                    "twice; its listing does not advance", operation="LIST", code="RepeatedContinuationToken",
                    bucket=self.bucket,
                )
            seen_tokens.add(token)

    def head_bucket(self) -> str:
        """HEAD on the bucket; returns the region S3 reports for it ('' when the server does not say)."""
        reply = self._request("HEAD", "", operation="HEAD bucket")
        return reply.header("x-amz-bucket-region")

    def conditional_delete(self) -> ConditionalDelete:
        """Whether this server honours If-Match on DELETE (AWS S3 does since 2025-09, some servers ignore
        it): found out once per client, by a probe on a scratch key under the prefix, then remembered."""
        if self._probe_lock_pid != os.getpid():  # a forked child must not wait for a lock its parent held
            self._probe_lock_pid, self._probe_lock_held = os.getpid(), threading.Lock()
        with self._probe_lock_held:
            if self._conditional_delete is None:
                self._conditional_delete = probe_conditional_delete(self, scratch_key(self.config.key_prefix, "probe"))
                logger.debug("conditional DELETE on %s: %s", self._base_url, self._conditional_delete.detail)
            return self._conditional_delete

    # The one place a request is built, signed, sent, retried and its errors parsed.

    def _request(
        self,
        method: str,
        key: str,
        *,
        query: Optional[Mapping[str, str]] = None,
        headers: Optional[Mapping[str, str]] = None,
        body: bytes = b"",
        operation: str = "",
    ) -> HttpReply:
        operation = operation or method
        url = self.object_url(key, query)
        headers = dict(headers or {})
        if self.config.expected_bucket_owner:
            headers["x-amz-expected-bucket-owner"] = self.config.expected_bucket_owner
        where = f"s3://{self.bucket}/{key}"
        refreshed = skew_corrected = False
        changes = method in ("PUT", "DELETE", "POST")
        may_have_landed = False  # an earlier attempt may have been applied with its reply lost
        attempt = 0
        while True:
            attempt += 1
            credentials = self.credentials.get()
            request = sign_request(method, url, headers, body, credentials, self.config.region, "s3")
            sent = time.monotonic()
            try:
                reply = self.transport.send(request)
            except _transport_errors() as exc:
                failure = classify_transport_error(exc)
                may_have_landed = may_have_landed or (changes and failure.may_have_arrived)
                if not failure.retry or attempt >= self.config.max_attempts:
                    error = self._transport_error(operation, key, failure, attempt, exc, credentials, may_have_landed)
                    if may_have_landed:
                        self._count_landed()
                    raise error from None
                self._backoff(attempt, operation, key, failure.what)
                continue
            self._note_server_time(reply)
            self._note_round_trip(time.monotonic() - sent)
            logger.info("%s %s: %s in %.0f ms", operation, where, reply.status, (time.monotonic() - sent) * 1000)
            if 200 <= reply.status < 300:
                if changes:
                    self._count_landed()
                return reply
            error = _error_from_reply(
                reply, operation=operation, bucket=self.bucket, key=key, region=self.config.region, method=method,
                unconditional_write=_is_unconditional_write(method, key, headers),
            )
            if isinstance(error, PreconditionFailedError):
                error.after_lost_reply = may_have_landed
            # A 5xx can come after the server applied the request (S3 answers 500 or 503 with the write
            # made): from here on, a 412 may be our own write, and a failure is "outcome unknown".
            if changes and (error.status >= 500 or error.code in _RETRYABLE_CODES - {"ConditionalRequestConflict"}):
                may_have_landed = True
            if error.code in ("InvalidAccessKeyId", "SignatureDoesNotMatch") or error.status == 403:
                # Which credentials were refused, never what they are beyond the masked key id.
                error.message = error.args[0].replace(
                    "; check the access key and secret",
                    f"; check the access key and secret of {self.credentials.source} "
                    f"(access key {mask_access_key(credentials.access_key)})",
                )
                error.args = (error.message,)
            if _is_clock_skew(error, reply):
                if not skew_corrected and _correct_clock(reply):
                    skew_corrected = True
                    continue
                raise _clock_skew_error(error, reply, where)
            if error.code in _EXPIRED_CODES and not refreshed:
                logger.info("credentials expired during %s %s; refreshing once", operation, where)
                self.credentials.refresh()
                refreshed = True
                continue
            if error.status in _RETRYABLE_STATUS or error.code in _RETRYABLE_CODES:
                if attempt < self.config.max_attempts:
                    self._backoff(attempt, operation, key, error.code or f"HTTP {error.status}")
                    continue
                landed = "; it may have been written all the same" if may_have_landed else ""
                error.args = (f"{error.message} (gave up after {attempt} attempt{'s' if attempt > 1 else ''}; "
                              f"raise max_attempts to retry longer){landed}",)
                error.message = error.args[0]
            error.may_have_landed = may_have_landed and not isinstance(error, PreconditionFailedError)
            if may_have_landed:
                self._count_landed()  # an earlier attempt may have landed (a 412 then may be it)
            raise error

    def _transport_error(
        self, operation: str, key: str, failure: TransportFailure, attempt: int, exc: BaseException,
        credentials: Credentials, may_have_landed: bool,
    ) -> S3Error:
        tries = f" after {attempt} attempts" if attempt > 1 else ""
        detail = redact(f"{type(exc).__name__}: {_first_line(exc)}", credentials)
        error = S3Error(
            f"{operation} s3://{self.bucket}/{key} failed{tries}: {self._base_url} could not be reached: "
            f"{failure.what} ({detail}); {failure.check}" + (", or raise max_attempts" if failure.retry else "")
            + ("; it may have been written all the same" if may_have_landed else ""),
            operation=operation,
            code=failure.code,
            bucket=self.bucket,
            key=key,
        )
        error.may_have_landed = may_have_landed
        return error

    def _count_landed(self) -> None:
        with self._count_lock:
            self.writes_landed += 1

    def _note_round_trip(self, seconds: float) -> None:
        # A smoothed round trip (1/8 of each new one, as TCP does), for waits that should match the network's.
        with self._count_lock:
            self.round_trip = seconds if not self.round_trip else self.round_trip + (seconds - self.round_trip) / 8

    def _note_server_time(self, reply: HttpReply) -> None:
        date = reply.header("Date")
        if date:
            self._last_date = (date, time.time(), time.monotonic())

    def server_now(self) -> Optional[float]:
        """The server's clock now, from the Date of the last reply (whole seconds); None when no reply had a
        usable Date, or one further off this machine's clock than MAX_CLOCK_CORRECTION."""
        date, received, received_monotonic = self._last_date
        server = parse_http_date(date) if date else None
        if server is None or abs(server - received) > MAX_CLOCK_CORRECTION:
            return None
        return server + (time.monotonic() - received_monotonic)  # a wall clock stepped meanwhile does not count

    def _backoff(self, attempt: int, operation: str, key: str, reason: str) -> None:
        delay = retry_delay(attempt)
        logger.debug(
            "retrying %s s3://%s/%s after %s (attempt %d of %d) in %.3f s",
            operation, self.bucket, key, reason, attempt, self.config.max_attempts, delay,
        )
        if self.on_retry is not None:
            self.on_retry(f"{operation} s3://{self.bucket}/{key}: {reason}; retrying (attempt {attempt + 1} of "
                          f"{self.config.max_attempts}) in {delay:.1f} s", attempt, delay)
        self._sleep(delay)


class ConditionalDelete(NamedTuple):
    """Whether a server honours If-Match on DELETE, and what its probe saw, in words."""

    honoured: bool
    detail: str


# An ETag no object has: the MD5 of nothing is d41d8cd9..., and S3 never mints one of all zeros.
STALE_ETAG = '"00000000000000000000000000000000"'


def scratch_key(prefix: str, purpose: str) -> str:
    """A key of this process's own under the prefix, for a probe or a check: no run's name, no folder."""
    # os.urandom, not the random module: a forked child inherits its parent's random state.
    return "/".join(filter(None, [prefix, f".runlog-s3-{purpose}-{os.urandom(8).hex()}"]))


def probe_conditional_delete(client: S3Client, key: str) -> ConditionalDelete:
    """Write a scratch object (If-None-Match: *), DELETE it with a stale If-Match and see whether it is
    kept, then delete it with its own ETag. Every request of the probe carries a condition."""
    etag = client.put_object(key, b'{"probe":"runlog-s3 conditional delete"}', if_none_match=True)
    try:
        client.delete_object(key, if_match=STALE_ETAG)
    except PreconditionFailedError:
        client.delete_object(key, if_match=etag)
        return ConditionalDelete(True, "a DELETE with a stale If-Match was refused (412) and the object kept")
    except S3Error as exc:
        if exc.status not in (400, 501):
            raise
        _delete_quietly(client, key, "")
        return ConditionalDelete(False, "this server does not support If-Match on DELETE: it answered "
                                        f"{exc.code or 'HTTP'} ({exc.status})")
    try:
        client.head_object(key)
    except NotFoundError:
        return ConditionalDelete(False, "this server ignores If-Match on DELETE: a DELETE with a stale If-Match "
                                        "deleted the object")
    _delete_quietly(client, key, etag)
    return ConditionalDelete(False, "this server ignores If-Match on DELETE: a DELETE with a stale If-Match was "
                                    "answered as done (the object was kept)")


def _delete_quietly(client: S3Client, key: str, etag: str) -> None:
    # Cleaning up after a probe or a check: a scratch object left behind is no run and harms nothing.
    try:
        client.delete_object(key, if_match=etag)
    except S3Error as exc:
        logger.debug("could not delete the scratch object s3://%s/%s: %s", client.bucket, key, exc.message)


def _is_unconditional_write(method: str, key: str, headers: Mapping[str, str]) -> bool:
    """A PUT or DELETE of an object that a bucket policy requiring conditional writes refuses."""
    return method in ("PUT", "DELETE") and bool(key) and not any(
        name.lower() in ("if-match", "if-none-match") for name in headers)


def _metadata_of(reply: HttpReply) -> Dict[str, str]:
    """The x-amz-meta-* headers of a reply, by name without the prefix."""
    return {name.lower()[len(_METADATA_HEADER):]: value for name, value in reply.headers.items()
            if name.lower().startswith(_METADATA_HEADER)}


def retry_delay(attempt: int) -> float:
    """Exponential backoff with jitter over its upper half: waits after attempts 1-7 add up to 6.4-12.7 s,
    so the default max_attempts rides out a server restart of several seconds."""
    ceiling = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def redact(text: str, credentials: Credentials) -> str:
    """The text with the secret key and token masked (see mask_secrets)."""
    return mask_secrets(text, (credentials.secret_key, credentials.token or ""))


_SKEW_CODES = frozenset({"RequestTimeTooSkewed", "RequestExpired", "RequestInTheFuture", "SignatureExpired"})


_SKEW_SUSPECTED = 300.0  # a bare 403 from a server whose clock is this far from ours (s): S3 allows 15 minutes


def _is_clock_skew(error: S3Error, reply: HttpReply) -> bool:
    message = error.message.lower()
    if error.code in _SKEW_CODES or (
        error.code in ("InvalidSignatureException", "AccessDenied", "SignatureDoesNotMatch")
        and ("skew" in message or "signature expired" in message or "not yet current" in message)
    ):
        return True
    # A HEAD's 403 has no body to say why: a Date far from our clock says it may be skew, worth one retry.
    server = _server_time(reply)
    return (error.status == 403 and not reply.body and server is not None
            and _SKEW_SUSPECTED < abs(server - wall_clock()) <= MAX_CLOCK_CORRECTION)


def parse_http_date(text: str) -> Optional[float]:
    """Seconds since the epoch of an HTTP date (a reply's Date or Last-Modified); None when unusable."""
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(text).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _server_time(reply: HttpReply) -> Optional[float]:
    return parse_http_date(reply.header("Date"))


def _correct_clock(reply: HttpReply) -> bool:
    """Learn the offset from the reply's Date header; False when the reply has no usable Date, or one
    further off than MAX_CLOCK_CORRECTION (a broken server clock, not ours to follow)."""
    server = _server_time(reply)
    if server is None:
        return False
    offset = server - time.time()
    if abs(offset) > MAX_CLOCK_CORRECTION:
        return False
    if abs(offset - _clock_offset["seconds"]) < 1:
        return False  # already corrected: the refusal is not about our clock
    _clock_offset["seconds"] = offset
    logger.info("this machine's clock is %+.0f s off the S3 server's; signing with the server's time from now on",
                -offset)
    return True


def _clock_skew_error(error: S3Error, reply: HttpReply, where: str) -> S3Error:
    server = _server_time(reply)
    if server is None:
        measured = "the reply has no usable Date header to measure the offset"
    elif abs(server - time.time()) > MAX_CLOCK_CORRECTION:
        measured = (f"the server's Date header {reply.header('Date')[:40]!r} is {server - time.time():+.0f} s from "
                    f"this machine's clock, more than the {MAX_CLOCK_CORRECTION / 3600:.0f} h this module corrects")
    else:
        measured = f"this machine's clock is {time.time() - server:+.0f} s off the server's"
    return S3Error(
        f"{error.operation} {where} failed: clock skew ({error.code}): {measured}; set the clock right (NTP)",
        operation=error.operation, code=error.code, status=error.status, bucket=error.bucket, key=error.key,
        request_id=error.request_id,
    )


# Run log documents ################################################################################
#
# A run log is a dict shaped like magnus's RunLog.dict(): run_id, status, steps (by internal name),
# parameters, run_config... Steps hold branches (by internal name), branches hold steps. These
# functions work on plain dicts so that neither the CLI nor a copy-in user needs magnus.

RUN_LOG_SUFFIX = ".json"
_MAX_KEY_BYTES = 1024  # S3's limit on a key
# A 1000-step run log is 330 KB; an object far past this is not one this store wrote, and parsing and
# rewriting it on every update would stall a pipeline (chunked-s3 is the layout for runs that large).
MAX_RUN_LOG_BYTES = 32 * 2**20


def validate_run_id(run_id: Any) -> str:
    """Return the run id, or raise InvalidRunIdError before any request is made."""
    if not isinstance(run_id, str) or not run_id:
        raise InvalidRunIdError(f"run id must be a non-empty string, not {run_id!r}")
    if run_id in (".", ".."):
        raise InvalidRunIdError(f"run id {run_id!r} is not allowed: it is a path segment")
    if "/" in run_id or "\\" in run_id:
        raise InvalidRunIdError(f"run id {run_id!r} must not contain '/' or '\\'")
    if _has_control_characters(run_id):
        raise InvalidRunIdError(f"run id {run_id!r} must not contain control characters")
    if run_id != run_id.strip():
        raise InvalidRunIdError(f"run id {run_id!r} must not begin or end with white space")
    return run_id


def run_log_key(prefix: str, run_id: str) -> str:
    """`<prefix>/<run_id>.json` (or `<run_id>.json` with no prefix), checked against S3's key limit."""
    validate_run_id(run_id)
    prefix = prefix.strip("/")
    key = f"{prefix}/{run_id}{RUN_LOG_SUFFIX}" if prefix else f"{run_id}{RUN_LOG_SUFFIX}"
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise InvalidRunIdError(
            f"run id of {len(run_id)} characters makes a key longer than S3's {_MAX_KEY_BYTES} bytes; use a shorter run id"
        )
    return key


def _to_json_value(value: Any) -> Any:
    # magnus puts its services' config objects (pydantic models, our Config) into the run config;
    # pydantic's RunLog.dict() would turn them into dicts, and so does this.
    if hasattr(value, "dict"):
        return value.dict()
    if hasattr(value, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_copy(value: Any) -> Any:
    """A deep copy holding only JSON values: what the document will hold once stored."""
    return json.loads(json.dumps(value, default=_to_json_value))


def encode_run_log(document: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON: every write rewrites the whole document, so every byte counts."""
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False, default=_to_json_value).encode("utf-8")


_RUN_LOG_FIELD_TYPES = {
    "run_id": str,
    "status": str,
    "steps": dict,
    "parameters": dict,
    "run_config": dict,
    "use_cached": bool,
}


def check_run_log(document: Any, where: str) -> Dict[str, Any]:
    """Return the document if it is shaped like a run log, else raise InvalidRunLogError naming `where`."""
    if not isinstance(document, dict):
        raise InvalidRunLogError(f"{where} is not a run log: JSON {type(document).__name__}, not an object")
    if "run_id" not in document:
        raise InvalidRunLogError(f"{where} is not a run log: it has no run_id")
    for name, kind in _RUN_LOG_FIELD_TYPES.items():
        if name in document and not isinstance(document[name], kind):
            raise InvalidRunLogError(
                f"{where} is not a run log: {name} is {type(document[name]).__name__}, not {kind.__name__}"
            )
    for name, step in document.get("steps", {}).items():
        if not isinstance(step, dict) or not isinstance(step.get("branches", {}), dict):
            raise InvalidRunLogError(f"{where} is not a run log: step {name!r} is not a step log object")
    return document


MAGNUS_STATUSES = ("CREATED", "PROCESSING", "SUCCESS", "FAIL", "TRIGGERED")


def check_run_log_shape(document: Dict[str, Any], where: str) -> None:
    """What a person writes by hand (put, edit) must be a run log magnus can read: a status of
    magnus's on the run and on every step and branch, steps and branches as objects. One line naming
    the field otherwise."""

    def fail(path: str, problem: str) -> None:
        raise InvalidRunLogError(f"{where}: {path}{problem}")

    def check_status(log: Mapping[str, Any], path: str) -> None:
        if "status" not in log:
            fail(path, "status is missing")
        if log["status"] not in MAGNUS_STATUSES:
            fail(path, f"status {log['status']!r} is not one of magnus's ({', '.join(MAGNUS_STATUSES)})")

    def walk(container: Mapping[str, Any], children: str, path: str) -> None:
        logs = container.get(children, {})
        if not isinstance(logs, dict):
            fail(path, f"{children} is {type(logs).__name__}, not an object of {children[:-1]} logs by internal name")
        for name, log in logs.items():
            inner = f"{path}{children}.{name}: "
            if not isinstance(log, dict):
                fail(inner, f"is {type(log).__name__}, not a {children[:-1]} log object")
            check_status(log, inner)
            walk(log, "branches" if children == "steps" else "steps", inner)

    check_status(document, "")
    walk(document, "steps", "")


def _too_large(size: int, where: str, outcome: str) -> str:
    return (
        f"{where} is {size / 2**20:.1f} MiB, over the {MAX_RUN_LOG_BYTES // 2**20} MiB limit of a run log; {outcome} "
        "(the chunked-s3 layout keeps each step and branch log in an object of its own)"
    )


def _check_size(body: bytes, where: str) -> None:
    if len(body) > MAX_RUN_LOG_BYTES:
        raise InvalidRunLogError(_too_large(len(body), where, "it was left as is"))


def decode_run_log(body: bytes, where: str) -> Dict[str, Any]:
    """Parse and check a stored run log; `where` (s3://bucket/key) goes into the error."""
    _check_size(body, where)
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        detail = "it is empty" if not body.strip() else f"{type(exc).__name__}: {exc}"
        raise InvalidRunLogError(f"{where} is not a run log: not valid JSON ({detail}); it was left as is") from exc
    return check_run_log(document, where)


# Internal names are dot paths (step.branch.step...). magnus forbids dots in step names, but a map's
# branch is named after its item (`each.data.csv` for the item "data.csv"), so a name is resolved
# against the logs that exist, never by splitting on every dot. The step types that hold branches:
# magnus 0.4's parallel, map and dag; runnable adds conditional and loop. A new branch goes to the
# longest step of these types whose name begins its own: a conditional inside a parallel's branch
# (`par.b1.cond.heads`) belongs to `par.b1.cond`, not to `par`.
_BRANCHING_STEP_TYPES = ("parallel", "map", "dag", "conditional", "loop")


def _parent_names(internal_name: str) -> Iterator[str]:
    """The proper dot prefixes of a name, longest first: the candidates for a branch's parent step."""
    position = len(internal_name)
    while True:
        position = internal_name.rfind(".", 0, position)
        if position <= 0:
            return
        yield internal_name[:position]


def _can_branch(step: Mapping[str, Any]) -> bool:
    return step.get("step_type", "parallel") in _BRANCHING_STEP_TYPES or bool(step.get("branches"))


def find_step(document: Dict[str, Any], internal_name: str) -> Dict[str, Any]:
    """The step log of an internal name: a step's own name has no dot, so its branch is what precedes
    the last one (or the run itself)."""
    parent_name = internal_name.rpartition(".")[0]
    container = find_branch(document, parent_name) if parent_name else document
    step = (container.get("steps") or {}).get(internal_name)
    if not isinstance(step, dict):
        raise LogNotFoundError(f"step log {internal_name!r} is not in run log {document.get('run_id')!r}")
    return step


def find_branch_parent(document: Dict[str, Any], internal_name: str, *, holding: bool) -> Dict[str, Any]:
    """The step a branch belongs to: the longest existing step whose name (plus '.') begins the branch's
    name; with holding, the one that already holds the branch."""
    candidates = []
    for candidate in _parent_names(internal_name):
        try:
            step = find_step(document, candidate)
        except LogNotFoundError:
            continue
        if internal_name in (step.get("branches") or {}):
            return step
        candidates.append(step)
    # A new branch: the longest step that can hold branches (by its step_type), else the longest step.
    if not holding and candidates:
        return next((step for step in candidates if _can_branch(step)), candidates[0])
    raise LogNotFoundError(
        f"branch log {internal_name!r} is not in run log {document.get('run_id')!r}"
        if holding
        else f"no step in run log {document.get('run_id')!r} can hold branch log {internal_name!r}"
    )


def find_branch(document: Dict[str, Any], internal_name: str) -> Dict[str, Any]:
    """The branch log of an internal name, or the run log itself for '' (the base dag)."""
    if not internal_name:
        return document
    step = find_branch_parent(document, internal_name, holding=True)
    return step["branches"][internal_name]


def _keep_stored_children(stored: Mapping[str, Any], given: Mapping[str, Any]) -> Dict[str, Any]:
    # Children (a step's branches, a branch's steps) are written through their own add_* call, maybe by
    # another process; a write of their parent adds the ones it brings but never undoes a stored one.
    merged = dict(given)
    merged.update(stored)
    return merged


def put_step_log(document: Dict[str, Any], step_log: Mapping[str, Any]) -> None:
    """Set a step log in its branch (or the run); its stored branches stay as they are."""
    internal_name = step_log["internal_name"]
    parent_name = internal_name.rpartition(".")[0]
    parent = find_branch(document, parent_name) if parent_name else document
    steps = parent.setdefault("steps", {})
    new = _json_copy(step_log)
    stored = steps.get(internal_name)
    if stored and stored.get("branches"):
        new["branches"] = _keep_stored_children(stored["branches"], step_log.get("branches", {}))
    steps[internal_name] = new


def put_branch_log(document: Dict[str, Any], branch_log: Mapping[str, Any]) -> None:
    """Set a branch log in its step; its stored steps stay as they are."""
    internal_name = branch_log["internal_name"]
    step = find_branch_parent(document, internal_name, holding=False)
    branches = step.setdefault("branches", {})
    new = _json_copy(branch_log)
    stored = branches.get(internal_name)
    if stored and stored.get("steps"):
        new["steps"] = _keep_stored_children(stored["steps"], branch_log.get("steps", {}))
    branches[internal_name] = new


def put_run_fields(document: Dict[str, Any], run_log: Mapping[str, Any]) -> None:
    """Set the run's own fields (status, tag, ...) from a whole run log; its steps, parameters and run
    config keep what is stored and gain only what is new."""
    for name, value in _json_copy(dict(run_log)).items():
        if name in ("steps", "parameters", "run_config"):
            document[name] = _keep_stored_children(document.get(name, {}), value or {})
        elif name != "run_id":
            document[name] = value


def update_parameters(document: Dict[str, Any], parameters: Mapping[str, Any]) -> None:
    """Add or overwrite parameters."""
    document.setdefault("parameters", {}).update(_json_copy(dict(parameters)))


def update_run_config(document: Dict[str, Any], run_config: Mapping[str, Any]) -> None:
    """Add or overwrite run config entries."""
    document.setdefault("run_config", {}).update(_json_copy(dict(run_config)))


def set_run_status(document: Dict[str, Any], status: str) -> None:
    """Set the run's status."""
    document["status"] = str(status)


def iter_steps(container: Mapping[str, Any], depth: int = 0) -> Iterator[Tuple[int, str, Dict[str, Any]]]:
    """Every step and branch under a run or branch, depth first: (depth, 'step' or 'branch', log)."""
    for step in container.get("steps", {}).values():
        yield depth, "step", step
        for branch in step.get("branches", {}).values():
            yield depth + 1, "branch", branch
            yield from iter_steps(branch, depth + 2)


# x-amz-meta-written-by on a run's object: the framework and version of the store that created it.
WRITTEN_BY = "written-by"
_PARAMETER_KINDS = ("json", "object", "metric")


def guess_framework(document: Mapping[str, Any]) -> str:
    """'runnable' or 'magnus' from a run log's shape, for runs created without a written-by tag: runnable
    types its parameters ({kind, value}), records input parameters per attempt and may hold a job log."""
    parameters = document.get("parameters") or {}
    typed = any(isinstance(value, dict) and value.get("kind") in _PARAMETER_KINDS and "value" in value
                for value in parameters.values())
    attempts = (attempt for _depth, kind, log in iter_steps(document) if kind == "step"
                for attempt in log.get("attempts") or [])
    if typed or "job" in document or any("input_parameters" in attempt for attempt in attempts):
        return "runnable"
    return "magnus"


def _is_strong_etag(etag: str) -> bool:
    return bool(etag) and not etag.startswith("W/")


def same_etag(a: str, b: str) -> bool:
    """Whether two ETags name the same version of an object, however the server quoted them: a LIST
    and a GET of one object may differ in quotes, and a proxy may mark an ETag weak (W/)."""
    return bool(_bare_etag(a)) and _bare_etag(a) == _bare_etag(b)


def chunked_version(run_etag: str, log_etags: Mapping[str, str]) -> str:
    """The version of a chunked run, as `get --etag` prints it and `put --if-match` and `edit` check it: a
    digest of the ETags of its run object and of every log object (changed by any write to any of them)."""
    import hashlib

    text = "\n".join([_bare_etag(run_etag)] + [f"{name} {_bare_etag(etag)}" for name, etag in sorted(log_etags.items())])
    return f'"chunked-{hashlib.sha256(text.encode()).hexdigest()[:32]}"'


def _require_strong_etag(etag: str, key: str, client: S3Client) -> None:
    """Refuse to update an object whose version cannot be named: the PUT would be a blind write."""
    if not _is_strong_etag(etag):
        given = f"a weak ETag {etag}" if etag else "no ETag"
        raise S3Error(
            f"{client.endpoint_url or 'the S3 endpoint'} answered GET s3://{client.bucket}/{key} with {given}, so a "
            "compare-and-swap cannot protect the update; nothing written (a proxy may rewrite replies): "
            "run `runlog-s3 check`",
            operation="GET", code="NoETag", bucket=client.bucket, key=key,
        )


def _check_write_size(body: bytes, where: str) -> None:
    # The limit holds on write too: a log no later read would accept is never stored.
    if len(body) > MAX_RUN_LOG_BYTES:
        raise InvalidRunLogError(_too_large(len(body), where, "nothing written"))


# The store's own state in a stored body (the chunked layout's replacement, below): never handed to a
# framework or shown by the command line, refused in a run log handed in.
STORE_FIELD = "_runlog_s3"


def unique(document: Mapping[str, Any]) -> Dict[str, Any]:
    """A document as stored: with a nonce of its own in the store's field, so that no two writes store the
    same bytes and an object's ETag never comes back to an earlier version's. A request held in the network
    with If-Match on a version can then never land on a later one that happens to hold the same content
    (a parameter handed back, a status set back)."""
    return dict(document, **{STORE_FIELD: dict(document.get(STORE_FIELD) or {}, write=new_token())})


def _without_nonce(document: Mapping[str, Any]) -> Dict[str, Any]:
    field = {name: value for name, value in (document.get(STORE_FIELD) or {}).items() if name != "write"}
    kept = {name: value for name, value in document.items() if name != STORE_FIELD}
    return dict(kept, **{STORE_FIELD: field}) if field else kept


def public(document: Mapping[str, Any]) -> Dict[str, Any]:
    """A stored document as a framework or a person sees it: without the store's own field."""
    return {name: value for name, value in document.items() if name != STORE_FIELD}


def check_input(document: Any, where: str) -> Dict[str, Any]:
    """A run log handed in to be stored: shaped like a run log, without the store's own field (logs lose
    theirs when stored)."""
    check_run_log(document, where)
    if STORE_FIELD in document:
        raise InvalidRunLogError(f"{where} holds {STORE_FIELD!r}, a field of this store's own; remove it; "
                                 "nothing written")
    return document


def removed_marker() -> Dict[str, Any]:
    """What rm leaves at a run's object: no run log, a token of its own (so its ETag is never another's).
    A create of the deleted run still in the network (If-None-Match) then fails instead of bringing it back."""
    return {STORE_FIELD: {"removed": new_token()}}


def new_token() -> str:
    """A random token: a replacement's, a marker's, an incarnation's; never drawn twice."""
    return os.urandom(8).hex()


MARKER_SIZE = len(encode_run_log(removed_marker()))  # every marker's: a HEAD of this size may be one
# After this long no request of a deleted run can still land: S3 refuses a SigV4 signature more than 15
# minutes from its clock (RequestTimeTooSkewed), whatever held the request. A signer whose clock runs up to
# 15 minutes ahead is never refused, so its request stays valid up to 30 minutes after it was sent; 5 more
# for the server's own delays. prune deletes older markers.
MARKER_KEPT_SECONDS = 35 * 60.0


def is_removed(document: Any) -> bool:
    """Whether a stored run object is rm's marker."""
    return isinstance(document, dict) and "removed" in (document.get(STORE_FIELD) or {}) and "run_id" not in document


def is_marker_body(body: bytes) -> bool:
    """Whether stored bytes are rm's marker."""
    if len(body) != MARKER_SIZE:
        return False
    try:
        return is_removed(json.loads(body))
    except ValueError:
        return False


def decode_run_object(body: bytes, where: str) -> Optional[Dict[str, Any]]:
    """A stored run object: its run log, or None for rm's marker (the run was deleted)."""
    return None if is_marker_body(body) else decode_run_log(body, where)


def scrub(body: bytes, secrets: List[str]) -> bytes:
    """The body with every credential value this process holds masked, in any of its forms (secret_forms): an
    executor may copy credentials into what it records (magnus 0.4's local-container puts them in
    run_config.variables), as values, in URLs, in query strings."""
    pattern = _secret_pattern(tuple(secrets), True)
    return pattern.sub(b"***", body) if pattern is not None else body


# The s3 layout: one object per run, every update a compare-and-swap ###############################
#
# S3RunLogs holds the compare-and-swap both layouts use (_mutate_object, _create_object) and rm's commit point
# (remove_run_object); the chunked-s3 layout below builds on it.

class _Version(NamedTuple):
    etag: str
    body: bytes
    document: Optional[Dict[str, Any]] = None  # parsed, when no caller holds a reference to it
    metadata: Optional[Mapping[str, str]] = None  # sent again with every rewrite (a PUT replaces it)


class _Writing:
    """Around one operation of a store: if it fails after any of its writes landed, or may have (a reply
    lost, a 5xx), its error says the outcome is unknown (RunlogS3Error.may_have_landed), never
    "nothing written"."""

    def __init__(self, client: S3Client):
        self._client = client

    def __enter__(self) -> None:
        self._before = self._client.writes_landed

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        if isinstance(error, RunlogS3Error) and self._client.writes_landed != self._before:
            error.say_may_have_landed()


class S3RunLogs:
    """The run logs under one bucket and prefix, as dicts, written with compare-and-swap.

    Reads are always fresh GETs. Each mutation is applied to the document as stored and written with
    If-Match on its ETag; a 412 means another writer won the race, so read again and re-apply. The last
    version seen of each object is kept as the base of the next compare-and-swap (with its parsed
    document after our own writes: parsing a 1000-step log costs more than sending it), so an
    uncontended mutation costs one PUT; a stale base costs a 412 and a GET, never a lost write.

    Layout `s3`: one object per run, `<prefix>/<run_id>.json`.
    """

    layout = "s3"
    _KEEP_VERSIONS = 16

    def __init__(self, client: S3Client, *, clock: Optional[Callable[[], float]] = None):
        self.client = client
        self.prefix = client.config.key_prefix
        self._clock = clock or time.monotonic
        self._versions: Dict[str, _Version] = {}
        self._versions_lock = threading.Lock()
        self._lock_pid = os.getpid()
        self.conflicts = 0  # compare-and-swaps lost to another writer, for logs and the benchmark
        self.writer = ""  # "runnable 0.50.0": tagged (x-amz-meta-written-by) on each run this creates
        self._writers: Dict[str, str] = {}  # the tag of each run object read, by run id

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.client.bucket!r}, prefix={self.prefix!r})"

    def key(self, run_id: str) -> str:
        """The key of a run's log."""
        return run_log_key(self.prefix, run_id)

    def where(self, run_id: str) -> str:
        """s3://bucket/key, for messages."""
        return self._url(self.key(run_id))

    def _url(self, key: str) -> str:
        return f"s3://{self.client.bucket}/{key}"

    def _not_found(self, run_id: str, removed: bool = False, left: int = 0) -> RunLogNotFoundError:
        objects = "1 object of it is" if left == 1 else f"{left} objects of it are"
        what = (f" (it was deleted; {objects} left: rm {run_id} removes them)" if left else " (it was deleted)"
                ) if removed else ""
        error = RunLogNotFoundError(f"no run log for run id {run_id!r} at {self.where(run_id)}{what}")
        error.removed = removed
        return error

    # Reading.

    def read(self, run_id: str, full: bool = True) -> Dict[str, Any]:
        """The stored run log. Raises RunLogNotFoundError, or InvalidRunLogError for a foreign object."""
        return self.read_version(run_id)[0]

    def read_version(self, run_id: str) -> Tuple[Dict[str, Any], str]:
        """The stored run log and its ETag: what a later replace_if_unchanged must find unchanged."""
        stored = self._get(self.key(run_id), lambda: self._not_found(run_id))
        document = decode_run_object(stored.body, self.where(run_id))
        if document is None:
            raise self._not_found(run_id, removed=True)
        self._remember(stored.key, stored.etag, stored.body, metadata=stored.metadata or None)
        self._writers[run_id] = stored.metadata.get(WRITTEN_BY, "")
        return public(document), stored.etag

    def read_step(self, run_id: str, internal_name: str) -> Dict[str, Any]:
        """A step log by its internal name (LogNotFoundError when absent)."""
        return find_step(self.read(run_id), internal_name)

    def read_branch(self, run_id: str, internal_name: str) -> Dict[str, Any]:
        """A branch log by its internal name, or the run log itself for '' (the base dag)."""
        return find_branch(self.read(run_id, full=not internal_name), internal_name)

    def written_by(self, run_id: str, document: Mapping[str, Any]) -> str:
        """Which framework wrote a run just read: the tag its creator left, else guessed from its shape."""
        return self._writers.get(run_id) or guess_framework(document)

    def writer_tag(self, run_id: str) -> str:
        """The written-by tag of a run just read, exactly as stored ('' when it has none): what export records."""
        return self._writers.get(run_id, "")

    def exists(self, run_id: str) -> bool:
        """Whether the run has a log in this layout: one HEAD (and a GET if it is the size of rm's marker)."""
        key = self.key(run_id)
        try:
            info = self.client.head_object(key)
            if info.size == MARKER_SIZE and decode_run_object(self.client.get_object(key).body, self._url(key)) is None:
                return False
        except NotFoundError as exc:
            if isinstance(exc, NoSuchBucketError):
                raise
            return False
        except InvalidRunLogError:
            pass  # an object that is not a run log: it is there, and reading it says what it is
        self._writers[run_id] = info.metadata.get(WRITTEN_BY, "")
        return True

    # Writing: the operations of magnus's interface.

    def create(self, document: Dict[str, Any]) -> None:
        """Store a new run log; RunLogExistsError if one is there (unless it is ours, whose reply was lost)."""
        with _Writing(self.client):
            run_id = document["run_id"]
            body = self._encode(check_input(document, "the run log to create"))
            self._create_object(
                self.key(run_id),
                body,
                lambda: RunLogExistsError(f"a run log for run id {run_id!r} already exists at {self.where(run_id)}"),
                metadata=self._creator_tags(), run_object=True,
            )

    def _creator_tags(self) -> Optional[Dict[str, str]]:
        # Kept by every later compare-and-swap (they send an object's metadata again).
        return {WRITTEN_BY: self.writer} if self.writer else None

    def replace(self, document: Dict[str, Any]) -> None:
        """Replace the whole run log (put --force): If-Match on the version read, read again after a 412;
        the last writer wins. A missing run is created."""
        with _Writing(self.client):
            new = _json_copy(check_input(document, "the run log to write"))

            def replace_all(stored: Dict[str, Any]) -> None:
                stored.clear()
                stored.update(new)

            self._mutate_object(self.key(document["run_id"]), replace_all, decode_run_object, None,
                                new_metadata=self._creator_tags)

    def replace_if_unchanged(self, document: Dict[str, Any], etag: str) -> None:
        """Replace the whole run log only if its ETag is still `etag` (PreconditionFailedError if not)."""
        with _Writing(self.client):
            run_id = document["run_id"]
            body = self._encode(check_input(document, "the run log to write"))
            key = self.key(run_id)
            _check_write_size(body, self._url(key))
            tags = self._kept_tags(run_id)
            try:
                new_etag = self.client.put_object(key, body, if_match=etag, metadata=tags)
            except PreconditionFailedError as exc:
                # An earlier attempt may have landed with its reply lost: then the stored bytes are ours.
                stored = self._get_or_none(key) if exc.after_lost_reply else None
                if stored is None or stored.body != body:
                    raise
                new_etag = stored.etag
            self._remember(key, new_etag, body, metadata=tags)

    def check_writable(self, document: Mapping[str, Any]) -> None:
        """Raise what writing `document` would raise for its keys and sizes, sending nothing: import checks
        every run of an archive before it writes any."""
        _check_write_size(encode_run_log(document), self.where(document["run_id"]))

    def _kept_tags(self, run_id: str) -> Optional[Dict[str, str]]:
        # A rewrite of the whole run log (put, edit) keeps who created the run, as last read or written
        # here (a GET or a HEAD), else this store's own.
        with self._lock():
            held = self._versions.get(self.key(run_id))
        creator = (held.metadata or {}).get(WRITTEN_BY, "") if held is not None else ""
        creator = creator or self._writers.get(run_id) or self.writer
        return {WRITTEN_BY: creator} if creator else None

    def add_step(self, run_id: str, step_log: Mapping[str, Any]) -> None:
        """Set a step log in its branch; branches stored under it by other writers are kept."""
        self.mutate(run_id, lambda document: put_step_log(document, step_log))

    def add_branch(self, run_id: str, branch_log: Mapping[str, Any]) -> None:
        """Set a branch log in its step; its stored steps are kept."""
        self.mutate(run_id, lambda document: put_branch_log(document, branch_log))

    def set_run_fields(self, run_id: str, run_log: Mapping[str, Any]) -> None:
        """put_run_log: set the run's own fields from a run log; its stored logs, parameters and run config
        are kept (new ones added). A run not created yet is created, as the frameworks' base classes do."""
        with _Writing(self.client):
            try:
                self.mutate(run_id, lambda document: put_run_fields(document, run_log))
            except RunLogNotFoundError:
                try:
                    self.create(dict(run_log))
                except RunLogExistsError:  # created meanwhile: set the fields on it
                    self.mutate(run_id, lambda document: put_run_fields(document, run_log))

    def set_parameters(self, run_id: str, parameters: Mapping[str, Any]) -> None:
        """Add or overwrite the parameters that differ from the version this process last saw: magnus
        hands back every parameter after each task, and writing back one the task left as it found it
        would undo another branch's change made meanwhile. Nothing changed sends nothing."""
        with _Writing(self.client):
            changed = self._changed_parameters(self.key(run_id), lambda document: document, parameters)
            if changed:
                self.mutate(run_id, lambda document: update_parameters(document, changed))

    def set_branch_parameters(self, run_id: str, internal_name: str, parameters: Mapping[str, Any]) -> None:
        """Add or overwrite the parameters of a branch (runnable scopes parameters to branches)."""
        with _Writing(self.client):
            changed = self._changed_parameters(
                self.key(run_id), lambda document: find_branch(document, internal_name), parameters)
            if changed:
                self.mutate(run_id, lambda document: update_parameters(find_branch(document, internal_name), changed))

    def set_run_config(self, run_id: str, run_config: Mapping[str, Any]) -> None:
        """Add or overwrite run config entries; none given changes nothing and sends nothing."""
        if run_config:
            self.mutate(run_id, lambda document: update_run_config(document, run_config))

    def set_status(self, run_id: str, status: str) -> None:
        """Set the run's status."""
        self.mutate(run_id, lambda document: set_run_status(document, status))

    def mutate(self, run_id: str, change: Callable[[Dict[str, Any]], Any]) -> Dict[str, Any]:
        """Apply `change` to the run log and store it with compare-and-swap; returns what was stored."""
        with _Writing(self.client):
            return self._mutate_object(self.key(run_id), change, self._decode_run, lambda: self._not_found(run_id))

    def _decode_run(self, body: bytes, where: str) -> Optional[Dict[str, Any]]:
        return decode_run_object(body, where)

    def _changed_parameters(
        self, key: str, container: Callable[[Dict[str, Any]], Dict[str, Any]], parameters: Mapping[str, Any]
    ) -> Dict[str, Any]:
        given = _json_copy(dict(parameters))
        with self._lock():
            held = self._versions.get(key)
        if held is None:
            return given
        try:
            document = held.document if held.document is not None else json.loads(held.body)
            seen = container(document).get("parameters") or {}
        except (ValueError, RunlogS3Error, AttributeError):
            return given
        return {name: value for name, value in given.items() if name not in seen or seen[name] != value}

    # Removing and listing.

    def delete(self, run_id: str, if_match: str = "", marker: bool = True) -> int:
        """Delete the run log (RunLogNotFoundError when there is none); returns the objects deleted. Only the
        version `if_match` names, else the one a GET finds: a run written meanwhile is not deleted unseen
        (PreconditionFailedError). The run log becomes rm's marker (see remove_run_object), unless `marker` is
        False (a run last written longer ago than MARKER_KEPT_SECONDS: no request of it can land any more)."""
        with _Writing(self.client):
            self.remove_run_object(run_id, if_match or self._live_etag(run_id), marker)
            return 1

    def _live_etag(self, run_id: str) -> str:
        # The version of the run object to delete: one GET (a HEAD could not tell rm's marker from a run).
        key = self.key(run_id)
        stored = self._get(key, lambda: self._not_found(run_id))
        if is_marker_body(stored.body):
            raise self._not_found(run_id, removed=True)
        return stored.etag

    def remove_run_object(self, run_id: str, etag: str, marker: bool = True) -> None:
        """The commit point of rm: the run object, still at version `etag`, becomes rm's marker (If-Match).
        A 412 after a lost reply is ours if the marker found is ours (its token); else the run was written
        since it was checked: PreconditionFailedError, nothing deleted. Without `marker`: a DELETE If-Match."""
        key = self.key(run_id)
        if not marker:
            if not self._delete_if_unchanged(key, etag):
                raise PreconditionFailedError(f"{self.where(run_id)} was written since it was checked; nothing deleted",
                                              operation="DELETE", status=412, code="PreconditionFailed",
                                              bucket=self.client.bucket, key=key)
            self._forget([key])
            return
        body = encode_run_log(removed_marker())
        try:
            self.client.put_object(key, body, if_match=etag)
        except PreconditionFailedError as exc:
            stored = self._get_or_none(key)
            if stored is not None and stored.body == body and exc.after_lost_reply:
                pass  # our marker: an earlier attempt landed, its reply lost
            elif stored is None or is_marker_body(stored.body):  # deleted meanwhile, by another rm
                raise self._not_found(run_id, removed=True) from exc
            else:
                raise PreconditionFailedError(f"{self.where(run_id)} was written since it was checked; nothing deleted",
                                              operation="PUT", status=412, code="PreconditionFailed",
                                              bucket=self.client.bucket, key=key) from exc
        except NotFoundError as exc:  # deleted meanwhile (If-Match on a missing key: 404 on AWS)
            if isinstance(exc, NoSuchBucketError):
                raise
            raise self._not_found(run_id) from exc
        self._forget([key])

    def delete_marker(self, run_id: str, etag: str) -> None:
        """Delete rm's marker of a run (If-Match its version: a run created over it since stays). Only once no
        request of the deleted run can land any more (MARKER_KEPT_SECONDS): prune's."""
        key = self.key(run_id)
        with _Writing(self.client):
            if not self._delete_if_unchanged(key, etag):
                raise PreconditionFailedError(f"{self._url(key)} was written since it was checked; nothing deleted",
                                              operation="DELETE", status=412, code="PreconditionFailed",
                                              bucket=self.client.bucket, key=key)

    def _delete_if_unchanged(self, key: str, etag: str) -> bool:
        """DELETE If-Match `etag`; False when the object was written since (it stays). The condition is
        always sent: a server that ignores it deletes as it would have anyway. One that refuses it (501,
        400) gets plain DELETEs from then on, said once; so does one that `conditional_delete` finds
        ignoring it (found out once per client, only to say so: a failed probe never drops the condition)."""
        if not self.client.delete_condition_refused:
            self._say_if_delete_condition_ignored()
            try:
                self.client.delete_object(key, if_match=etag)
                return True
            except PreconditionFailedError:
                # Written since, or gone: a server may answer If-Match on a missing key with 412 (SeaweedFS),
                # the retry of a DELETE whose reply was lost included. Gone is deleted.
                return self._get_or_none(key) is None
            except NotFoundError as exc:  # gone already (a concurrent rm, or our first attempt, its reply lost)
                if isinstance(exc, NoSuchBucketError):
                    raise
                return True
            except S3Error as exc:
                if exc.status not in (400, 501):
                    raise
                self.client.delete_condition_refused = True
                logger.warning("%s refuses If-Match on DELETE (%s); deleting without it: an object written "
                               "meanwhile is deleted too", self.client.endpoint_url or "S3", exc.code or exc.status)
        self.client.delete_object(key)
        return True

    def read_run_object(self, run_id: str) -> Tuple[Dict[str, Any], str]:
        """The run's own object and its ETag: the whole run log here (one GET)."""
        return self.read_version(run_id)

    def _say_if_delete_condition_ignored(self) -> None:
        if self.client.said_unconditional_delete:
            return
        self.client.said_unconditional_delete = True
        try:
            found = self.client.conditional_delete()
        except RunlogS3Error as exc:  # the probe needs PutObject on the prefix: without it, say nothing
            logger.debug("could not find out whether DELETE honours If-Match: %s", exc.message)
            return
        if not found.honoured:
            logger.warning("%s: %s; rm cannot tell an object written while it deletes",
                           self.client.endpoint_url or "S3", found.detail)

    def list(self) -> List[ObjectInfo]:
        """Every run of this layout under the prefix as (run id in .key, size, last-modified), oldest first."""
        return self.runs_in(self.list_top_level())

    def list_top_level(self) -> List[ObjectInfo]:
        """One delimited LIST of the prefix: objects and (as keys ending in '/') common prefixes."""
        return list(self.client.list_objects(self._list_prefix(), delimiter="/"))

    def runs_in(self, entries: List[ObjectInfo]) -> List[ObjectInfo]:
        """The runs of this layout in a top-level listing, oldest first."""
        prefix = self._list_prefix()
        runs = []
        for info in entries:
            name = info.key[len(prefix):]
            if name.endswith(RUN_LOG_SUFFIX) and "/" not in name:
                runs.append(ObjectInfo(name[: -len(RUN_LOG_SUFFIX)], info.size, info.etag, info.last_modified))
        return sorted(runs, key=lambda run: (run.last_modified, run.key))

    def _list_prefix(self) -> str:
        return f"{self.prefix}/" if self.prefix else ""

    # Compare-and-swap on one object, shared by both layouts.

    def _encode(self, document: Mapping[str, Any]) -> bytes:
        """The bytes to store: unique (see unique), secrets masked."""
        return scrub(encode_run_log(unique(document)), self.client.credentials.secrets())

    def _get(self, key: str, missing: Callable[[], RunlogS3Error]) -> S3Object:
        stored = self._get_or_none(key)
        if stored is None:
            raise missing()
        return stored

    def _get_or_none(self, key: str) -> Optional[S3Object]:
        try:
            return self.client.get_object(key)
        except NotFoundError as exc:
            if isinstance(exc, NoSuchBucketError):
                raise
            return None

    def _create_object(
        self,
        key: str,
        body: bytes,
        exists: Optional[Callable[[], RunlogS3Error]],
        metadata: Optional[Mapping[str, str]] = None,
        *,
        run_object: bool = False,
    ) -> bool:
        """PUT If-None-Match: *. True if stored; if the key exists, raise exists() (or return False when None).
        A run's object (run_object) that rm left as its marker is taken over: If-Match the marker."""
        _check_write_size(body, self._url(key))
        over = ""  # the ETag of the marker written over, once one is found
        deadline = self._clock() + self.client.config.conflict_timeout
        rounds = 0
        while True:
            rounds += 1
            try:
                if over:
                    etag = self.client.put_object(key, body, if_match=over, metadata=metadata)
                else:
                    etag = self.client.put_object(key, body, if_none_match=True, metadata=metadata)
                break
            except (PreconditionFailedError, NotFoundError) as exc:
                if isinstance(exc, NoSuchBucketError):
                    raise
                # Ours only if an earlier attempt of this PUT may have landed with its reply lost, and the
                # stored bytes are ours; an equal body written by someone else is not our write.
                lost = getattr(exc, "after_lost_reply", False)
                stored = self._get_or_none(key) if lost or run_object else None
                if stored is not None and lost and stored.body == body:
                    etag = stored.etag
                    break
                if run_object and (stored is None or is_marker_body(stored.body)):
                    over = stored.etag if stored is not None else ""  # a marker (or none any more): again
                    if rounds > 1:
                        self._next_round(rounds, deadline, self._url(key), "it was deleted and created again meanwhile",
                                         doing="creating")
                    continue
                if exists is None:
                    return False
                raise exists() from exc
        self._remember(key, etag, body, metadata=metadata)
        return True

    def _mutate_object(
        self,
        key: str,
        change: Callable[[Dict[str, Any]], Any],
        decode: Callable[[bytes, str], Optional[Dict[str, Any]]],
        missing: Optional[Callable[[], RunlogS3Error]],
        *,
        new_metadata: Optional[Callable[[], Optional[Dict[str, str]]]] = None,
    ) -> Dict[str, Any]:
        """Apply `change` to the object's document and store it with If-Match, re-applying after a 412;
        returns the document stored.

        `change` must only set values (it may run more than once, on fresher documents), and only
        values it owns: the document functions above copy what they are given. With `missing` None an
        absent object (or one `decode` reads as absent: None) is created from `change({})` with
        If-None-Match: * (or If-Match on what stands for absent), keeping
        `new_metadata()`; an existing object keeps its metadata. A change that changes nothing in a
        version just read sends nothing (the read is its moment); a held version is never trusted for
        that: the PUT, If-Match, finds out. Every round after the first waits (jittered, growing) and
        counts against conflict_timeout.
        """
        where = self._url(key)
        deadline = self._clock() + self.client.config.conflict_timeout
        rounds = 0
        may_create = missing is None  # a new object costs one PUT: If-None-Match first, read only if it exists
        while True:
            rounds += 1
            version = self._pop_version(key)
            fresh = version is None
            if fresh and may_create:
                may_create = False
                created: Dict[str, Any] = {}
                change(created)
                body = self._encode(created)
                _check_write_size(body, where)
                new_tags = new_metadata() if new_metadata else None
                try:
                    etag = self.client.put_object(key, body, if_none_match=True, metadata=new_tags)
                except PreconditionFailedError:
                    continue  # it exists (or our own create landed, its reply lost): read it and apply the change
                self._remember(key, etag, body, metadata=new_tags)
                return created
            if fresh:
                stored = self._get_or_none(key)
                if stored is not None:
                    _require_strong_etag(stored.etag, key, self.client)
                    version = _Version(stored.etag, stored.body, metadata=stored.metadata or None)
            document: Optional[Dict[str, Any]] = None
            if version is not None:
                document = version.document if version.document is not None else decode(version.body, where)
            metadata: Optional[Mapping[str, str]] = (
                version.metadata if version is not None and document is not None else None)
            if document is None:  # absent, or a tombstone
                if missing is not None:
                    raise missing()
                document = {}
                metadata = new_metadata() if new_metadata else None
            secrets = self.client.credentials.secrets()
            unchanged = encode_run_log(_without_nonce(document)) if fresh and version is not None else None
            change(document)
            if unchanged is not None and scrub(encode_run_log(_without_nonce(document)), secrets) == unchanged:
                assert version is not None
                self._remember(key, version.etag, version.body, None, version.metadata)  # nothing to change
                return document
            stored_document = unique(document)
            plain = encode_run_log(stored_document)
            body = scrub(plain, secrets)
            _check_write_size(body, where)
            try:
                if version is None:
                    etag = self.client.put_object(key, body, if_none_match=True, metadata=metadata)
                else:
                    etag = self.client.put_object(key, body, if_match=version.etag, metadata=metadata)
            except PreconditionFailedError as exc:
                self.conflicts += 1
                logger.debug("%s changed under us (round %d); reading it again", where, rounds)
                if exc.after_lost_reply or (not fresh and rounds == 1):
                    continue  # our own write may have landed, or our held version was stale: read again
                self._next_round(rounds, deadline, where, "other writers kept changing it")
                continue
            except NotFoundError as exc:  # deleted since we read it
                if isinstance(exc, NoSuchBucketError):
                    raise
                if missing is not None:
                    raise missing() from exc
                self._next_round(rounds, deadline, where, "it was deleted while being written")
                continue
            self._remember(key, etag, body, stored_document if body is plain else None, metadata)  # parsed: not again
            return document

    def _next_round(
        self, rounds: int, deadline: float, where: str, reason: str, doing: str = "updating",
        remedy: str = "raise conflict_timeout, or use the chunked-s3 store for wide fan-outs",
    ) -> None:
        # Every retry loop ends at the conflict deadline, and waits between rounds.
        if self._clock() >= deadline:
            raise ConflictError(
                f"gave up {doing} {where} after {rounds} rounds in {self.client.config.conflict_timeout:g} s: "
                f"{reason}; nothing written; {remedy}"
            )
        self._backoff(rounds)

    def _forget(self, keys: List[str]) -> None:
        with self._lock():
            for key in keys:
                self._versions.pop(key, None)

    def _pop_version(self, key: str) -> Optional[_Version]:
        with self._lock():
            return self._versions.pop(key, None)

    def _lock(self) -> threading.Lock:
        # A child forked while a thread of the parent held the lock must not wait for it forever.
        if self._lock_pid != os.getpid():
            self._versions_lock, self._lock_pid = threading.Lock(), os.getpid()
        return self._versions_lock

    def _remember(
        self,
        key: str,
        etag: str,
        body: bytes,
        document: Optional[Dict[str, Any]] = None,
        metadata: Optional[Mapping[str, str]] = None,
    ) -> None:
        if not _is_strong_etag(etag):
            return
        with self._lock():  # the chunked layout writes from a pool of threads
            self._versions.pop(key, None)
            self._versions[key] = _Version(etag, body, document, metadata)
            while len(self._versions) > self._KEEP_VERSIONS:
                self._versions.pop(next(iter(self._versions)))

    def _backoff(self, rounds: int) -> None:
        # Full-jitter waits in slots of one round trip (5 ms at least), doubling each round, so that losers
        # spread out over the time a winner's write takes on this network, not loopback's. (Reading first after
        # a recent 412, rather than a PUT on the version held, cost more: 463 GETs and 284 PUTs for the 64-log
        # pipeline on SeaweedFS behind 20 ms, against 373 and 270; not kept.)
        slot = max(0.005, self.client.round_trip)
        time.sleep(random.uniform(0, min(0.5, slot * 2 ** min(rounds, 10))))


# The chunked-s3 layout ############################################################################
#
# Layout `chunked-s3`: under <prefix>/<run_id>/ one object per step log and per branch log, named
# after its internal name, and RunLog.json with the run's own fields, parameters and run config.
# Writers of different steps never touch the same object; the same object is written with the
# compare-and-swap above. Reading the whole tree is a GET and a LIST at once, then concurrent GETs.
#
# Replacing a run (put --force, import, a new run created with its logs) changes many objects, yet a
# reader sees the old run log or the new one, never a mix; a write that lands late (held in the network
# past every retry) never brings back what a later put or rm replaced. The protocol:
#
# - Epochs. RunLog.json's body carries, in STORE_FIELD, the run's epoch "I.g": an incarnation I, random,
#   drawn when the run is created, and a generation g, counted up by each replacement. Every log object
#   carries the epoch its writer found current (its stamp). Epochs of one run are ordered by g; an epoch
#   never comes back: RunLog.json's versions form one chain of If-Match writes, none lowers g, I is
#   never drawn twice, and an rm leaves a marker (below) so that a create held in the network fails.
# - States of RunLog.json: absent; removed (a marker: STORE_FIELD {removed: token}, no run fields); live
#   at epoch E; live at E with an intent {token, since, logs D (name -> own fields)}: a replacement
#   committed and not yet rolled forward.
# - View (what every reader shows): a log object stamped E shows as stored. Any other (older, of another
#   incarnation, or absent) shows as D[name] while RunLog.json holds an intent whose D has it, else as
#   absent. So the view changes only at a commit point or at a write stamped with the current epoch.
# - The writer's rule: a log written with stamp S is sent If-None-Match, or If-Match a version stamped S
#   or older (of S's incarnation; one of another incarnation only once RunLog.json, read after it, shows
#   S's). Then no write ever hides a log that shows: over one stamped with the current epoch C, only a
#   write stamped C lands (S <= C, so S = C: an ordinary later write); over an older one, a write stamped
#   C shows (a later write) and one stamped below C does not change the view.
# - Commit points, each one PUT of RunLog.json: create (If-None-Match, or If-Match a marker) at (new I,
#   0); replacement (If-Match the version read) at (I, g + 1) with its intent; rm (If-Match) to a marker.
#   Before its commit point an operation has written nothing that shows.
# - Roll forward (the replacement's writer, or any writer of RunLog.json that finds an intent older than
#   REPLACEMENT_GRACE, or the next replacement): PUT D[name] stamped with the new epoch, If-Match the ETag
#   listed before the commit (older for sure) or If-None-Match; after a 412, GET it: stamped older, it is
#   overwritten (If-Match); the same or newer, it stays (a later write). Then the intent is cleared by
#   compare-and-swap. No step of it changes the view.
# - Reads. One log: GET RunLog.json and GET the log at once. A log stamped with the epoch read shows. An
#   older or absent one shows as the intent says, when RunLog.json holds one; without one, as absent only
#   if a RunLog.json read that finished before the call began has the same epoch and no intent either
#   (else the log may have been rolled forward between the two GETs: read again, that read held). Newer:
#   read again. The whole run: GET RunLog.json and LIST the folder at once; if the LIST was one page and
#   shows RunLog.json's ETag it was taken while that version stood, else it is LISTed again. Then GETs of
#   the logs (not of one whose listed ETag is a version held here: those bytes), each shown by the view.
# - Writes of a log: GET RunLog.json (and the parent, unless this process knows it shows at the epoch
#   read: its own write of it, or a read that showed it), then PUT the log stamped with that epoch, If-Match
#   its version held if the writer's rule allows, else If-None-Match; after a 412, GET it: that is the base.
#   The parent must show (BranchLogNotFoundError otherwise). RunLog.json comes before the PUT, not with it:
#   a put that commits after the read orders the write before it (stamped older, it never shows), while a
#   read sent alongside could not tell a put committed before the call began (the write must be sent
#   again) from one committed just after the write landed and showed (sent again, it would come back).
# - Why no interleaving loses, mixes or hangs. A write is ordered where its epoch was read: its parent
#   showed then, and a log that shows at an epoch shows for all of it (only rm removes objects, and only
#   after its marker). Landing later, after a commit, it does not show: that put came after it, and by the
#   writer's rule it hides nothing. A read of one log shows the view of a moment inside the call: a log
#   stamped with the epoch read was written at it; an older or absent one is shown by the intent read
#   with it, or as absent when RunLog.json had that epoch and no intent both before the call and during it
#   (so no roll-forward ran between). A full read shows logs of the epoch read and D for the rest, so never
#   a mix; a log stamped newer sends it round again. Every loop is bounded by conflict_timeout; whoever
#   finds an intent can finish it, so a stopped writer holds nothing up.
# - rm: LIST the folder, then RunLog.json becomes a marker (If-Match the version checked; after a lost
#   reply the marker found is ours by its token), then the logs listed are deleted, If-Match as listed, and
#   those a LIST after the marker finds stamped with the deleted incarnation: a run created with the id
#   after the marker writes other bytes (its own stamps), so it loses nothing (its roll-forward writes a
#   log rm deleted under it If-None-Match).
#   With no live run (leftovers) rm deletes only if RunLog.json, read again after the LIST, is still not
#   live. The marker stays (45 bytes; prune removes those older than MARKER_KEPT_SECONDS): it fails a
#   create of the deleted run still in the network, and leftovers of any earlier incarnation never show
#   in a new one (their stamps are of another I). No LIST at create. A one-log read that finds its log
#   absent reads RunLog.json again before it says so: an rm committed between its two GETs is "deleted".
#   A log a parent carries is added only where nothing shows, not even an intent's D[name].
# - Late commits (the fence of a replacement's own commit). Log writes do not change RunLog.json, so a
#   replacement's commit held in the network past its writer's retries would still match its If-Match
#   and, landing later, hide logs written at the old epoch after its writer returned. So its intent
#   carries `was`, the live document it replaces (which holds no intent), and `until`: the server's
#   clock when its body was made plus one attempt's timeouts and COMMIT_MARGIN (the server's own
#   delays), in whole seconds. A version whose Last-Modified is after `until` is void: every reader
#   takes it as `was` (the same epoch, fields and view as the version it replaced), and the next write
#   of RunLog.json replaces it; Last-Modified is fixed at landing, so every reader judges it alike. A
#   write over a commit that counts keeps its intent without `until` and `was`: only the commit's own
#   version is judged. Its writer counts a commit by a 200 whose own Date is not past `until` (the
#   object's Last-Modified is at most that Date, on the server's clock), else only once a GET shows its
#   version. After a lost reply it looks; finding no commit of its own, it writes RunLog.json again as
#   it reads (a compare-and-swap no reader can tell), so that every attempt still in the network, each
#   If-Match the version before, fails: this holds whatever the clocks say. Only with the server out of
#   reach does it rely on them: it waits until the window has passed by its monotonic clock (from a
#   server Date read before the body was made: never early), looks again, and else says "may have
#   been written". So a commit lands within the window, before its writer returns, or changes nothing.
#   (Assumed: a server's nodes agree to within a second, and one completes a PUT within COMMIT_MARGIN
#   of receiving it, or a server that stamps Last-Modified on arrival could count one landing late.)

CHUNK_RUN_OBJECT = "RunLog.json"
_CHUNK_KINDS = {"StepLog-": "step", "BranchLog-": "branch"}
_CHUNK_CHILDREN = {"step": "branches", "branch": "steps"}
ASSEMBLY_THREADS = 16  # GETs in flight while assembling a run (the HTTP pool holds 16 connections)
REPLACEMENT_GRACE = 60.0  # seconds (server clock) after which any writer of RunLog.json finishes a replacement
COMMIT_MARGIN = 5.0  # seconds added to one attempt's timeouts: a replacement's commit window (see "Late commits")
_CREATED = "created-ns"  # x-amz-meta-created-ns: the creation order of a log, kept on rewrites


def chunk_name(kind: str, internal_name: str) -> str:
    """The object name of a step or branch log: StepLog-<name>.json, the name percent-encoded."""
    prefix = "StepLog-" if kind == "step" else "BranchLog-"
    return f"{prefix}{urllib.parse.quote(internal_name, safe='')}{RUN_LOG_SUFFIX}"


def decode_log_object(body: bytes, where: str) -> Dict[str, Any]:
    """Parse a stored step or branch log object; InvalidRunLogError naming `where` if it is not one."""
    _check_size(body, where)
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidRunLogError(f"{where} is not a step or branch log: not valid JSON; it was left as is") from exc
    if not isinstance(document, dict) or not isinstance(document.get("internal_name"), str):
        raise InvalidRunLogError(f"{where} is not a step or branch log: it has no internal_name")
    return document


def _own_fields(kind: str, log: Mapping[str, Any]) -> Dict[str, Any]:
    # What a chunk holds: the log without its children, which are chunks of their own.
    return _json_copy({name: value for name, value in log.items()
                       if name not in (_CHUNK_CHILDREN[kind], STORE_FIELD)})


def _chunks_under(kind: str, log: Mapping[str, Any]) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(kind, own fields) for every descendant of a step or branch log, parents first."""
    child_kind = "branch" if kind == "step" else "step"
    for child in (log.get(_CHUNK_CHILDREN[kind]) or {}).values():
        yield child_kind, _own_fields(child_kind, child)
        yield from _chunks_under(child_kind, child)


def assemble_run_log(
    run: Dict[str, Any], steps: List[Dict[str, Any]], branches: List[Dict[str, Any]], where: str = ""
) -> Dict[str, Any]:
    """The run log tree from its chunks (given oldest first), placed by their internal names; its keys in the
    frameworks' order (steps right after status), as the s3 layout stores them."""
    document: Dict[str, Any] = {}
    for name, value in run.items():
        document[name] = value
        if name == "status":
            document["steps"] = {}
    document["steps"] = {}
    steps_by_name = {step["internal_name"]: dict(step, branches={}) for step in steps}
    branches_by_name = {branch["internal_name"]: dict(branch, steps={}) for branch in branches}
    orphans = []
    for name, branch in branches_by_name.items():
        candidates = [steps_by_name[c] for c in _parent_names(name) if c in steps_by_name]
        parent = next((step for step in candidates if _can_branch(step)), candidates[0] if candidates else None)
        if parent is None:
            orphans.append(name)
        else:
            parent["branches"][name] = branch
    for name, step in steps_by_name.items():
        parent_name = name.rpartition(".")[0]
        parent = document if not parent_name else branches_by_name.get(parent_name)
        if parent is None:
            orphans.append(name)
        else:
            parent["steps"][name] = step
    if orphans:
        logger.warning("%s: %d logs have no parent log and were left out: %s", where, len(orphans), ", ".join(orphans[:5]))
    return document


class Epoch(NamedTuple):
    """A chunked run's epoch (see the protocol above): its incarnation, drawn when it was created, and its
    generation, counted up by each replacement. Stored as "I.g"; runs and logs stored before epochs have
    (''. 0) and match each other."""

    incarnation: str
    generation: int

    def __str__(self) -> str:
        return f"{self.incarnation}.{self.generation}"


def _parse_epoch(text: Any) -> Epoch:
    incarnation, _, generation = str(text or "").rpartition(".")
    return Epoch(incarnation, int(generation) if generation.isdigit() else 0)


def epoch_of(run_object: Mapping[str, Any]) -> Epoch:
    """The epoch of a run object (RunLog.json's body)."""
    return _parse_epoch((run_object.get(STORE_FIELD) or {}).get("epoch"))


def stamp_of(log: Mapping[str, Any]) -> Optional[Epoch]:
    """The epoch a log object was written at; None for a tombstone an earlier version of this store wrote."""
    field = log.get(STORE_FIELD) or {}
    return None if field.get("removed_by") else _parse_epoch(field.get("epoch"))


def compare_epochs(stamp: Optional[Epoch], epoch: Epoch) -> str:
    """'same', 'newer', or 'older' (also: absent, a tombstone, or of another incarnation) than `epoch`."""
    if stamp is None or stamp.incarnation != epoch.incarnation or stamp.generation < epoch.generation:
        return "older"
    return "same" if stamp.generation == epoch.generation else "newer"


def next_epoch(current: Optional[Mapping[str, Any]]) -> Epoch:
    """The epoch a commit point writes: a new run (or one over rm's marker) is a new incarnation, so whatever
    its folder holds never shows; a replacement counts the generation up."""
    if current is None:
        return Epoch(new_token(), 0)
    epoch = epoch_of(current)
    return epoch._replace(generation=epoch.generation + 1)


def _stamped(own: Mapping[str, Any], epoch: Epoch) -> Dict[str, Any]:
    """A log's own fields as stored: stamped with the epoch its writer found current."""
    return dict(own, **{STORE_FIELD: {"epoch": str(epoch)}})


def _intent_of(run_object: Mapping[str, Any]) -> Optional[Dict[str, Any]]:
    """The replacement under way in a run object's body, or None."""
    return (run_object.get(STORE_FIELD) or {}).get("replacing") or None


def landed_late(document: Mapping[str, Any], last_modified: str) -> bool:
    """Whether a version of RunLog.json is a replacement's commit that landed after its window ("Late
    commits"): void, it reads as the version it replaced."""
    intent = _intent_of(document) or {}
    landed = parse_http_date(last_modified) if last_modified and intent.get("until") is not None else None
    return landed is not None and int(landed) > int(intent["until"])


def _was(document: Mapping[str, Any]) -> Dict[str, Any]:
    # What a void commit reads as: the live document it replaced.
    return _json_copy(dict((_intent_of(document) or {})["was"]))


class RunObject(NamedTuple):
    """RunLog.json as read: the object, its document, its epoch, and the replacement under way (or None)."""

    stored: S3Object
    document: Dict[str, Any]
    epoch: Epoch
    intent: Optional[Dict[str, Any]]


class ChunkedS3RunLogs(S3RunLogs):
    """Layout `chunked-s3`: a run is a folder of objects, one per step log and per branch log."""

    layout = "chunked-s3"
    _KEEP_VERSIONS = 1024  # one per step this process writes: a rewrite of a step is then one PUT

    def __init__(self, client: S3Client, *, clock: Optional[Callable[[], float]] = None):
        super().__init__(client, clock=clock)
        # By run object key: an epoch and the logs known to show at it (written or read here): while that
        # epoch stands they show (see the protocol), so a child of one needs no GET of it.
        self._showing: Dict[str, Tuple[Epoch, set]] = {}
        # By log key: its own fields as last shown to this process (read or written), which may be a put's
        # under way rather than the object stored: what parameters handed back are diffed against.
        self._shown: Dict[str, Dict[str, Any]] = {}
        # Tokens of replacements whose commit this process found landed too late: void, each version of
        # RunLog.json carrying one reads as its intent's `was` (Last-Modified is not held with a version).
        self._void: set = set()

    def folder(self, run_id: str) -> str:
        """`<prefix>/<run_id>/`, the folder of a run's objects."""
        validate_run_id(run_id)
        return f"{self._list_prefix()}{run_id}/"

    def key(self, run_id: str) -> str:
        """The key of the run's own object (its fields, parameters and run config)."""
        return self._checked_key(self.folder(run_id) + CHUNK_RUN_OBJECT)

    def chunk_key(self, run_id: str, kind: str, internal_name: Any) -> str:
        """The key of a step ('step') or branch ('branch') log: derived from its name, so no LIST is needed."""
        if not isinstance(internal_name, str) or not internal_name:
            raise InvalidRunLogError(f"a {kind} log needs a non-empty internal_name, not {internal_name!r}")
        return self._checked_key(self.folder(run_id) + chunk_name(kind, internal_name))

    def where(self, run_id: str) -> str:
        return self._url(self.folder(run_id))

    @staticmethod
    def _checked_key(key: str) -> str:
        if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
            raise InvalidRunIdError(
                f"key {key[:60]}... is longer than S3's {_MAX_KEY_BYTES} bytes; use shorter run ids and step names"
            )
        return key

    @staticmethod
    def _kind_of(key: str, folder: str) -> str:
        name = key[len(folder):]
        for prefix, kind in _CHUNK_KINDS.items():
            if name.startswith(prefix) and name.endswith(RUN_LOG_SUFFIX) and "/" not in name:
                return kind
        return ""

    # RunLog.json, and what this process knows of it.

    def _get_or_none(self, key: str) -> Optional[S3Object]:
        stored = super()._get_or_none(key)
        if stored is not None and key.endswith("/" + CHUNK_RUN_OBJECT) and b'"until"' in stored.body:
            document = decode_run_object(stored.body, self._url(key))
            if document is not None and landed_late(document, stored.last_modified):
                with self._lock():
                    self._void.add((_intent_of(document) or {})["token"])
        return stored

    def _decode_run(self, body: bytes, where: str) -> Optional[Dict[str, Any]]:
        """RunLog.json's document as every reader takes it: a void commit's is the one it replaced."""
        document = decode_run_object(body, where)
        intent = _intent_of(document) if document is not None else None
        if document is None or intent is None:
            return document
        if intent.get("token") in self._void:
            return _was(document)
        intent.pop("until", None)  # it counts: a version written over it keeps the intent, not the window
        intent.pop("was", None)
        return document

    def _run_object(self, stored: S3Object) -> Optional[RunObject]:
        document = self._decode_run(stored.body, self._url(stored.key))
        if document is None:
            return None
        return RunObject(stored, document, epoch_of(document), _intent_of(document))

    def _read_run(self, run_id: str, stored: Optional[S3Object]) -> RunObject:
        """RunLog.json as just read, held as the base of the next compare-and-swap and as a version known
        current before the next call; RunLogNotFoundError when it is absent or rm's marker."""
        run = self._run_object(stored) if stored is not None else None
        if run is None or stored is None:
            raise self._not_found(run_id, removed=stored is not None)
        self._remember(stored.key, stored.etag, stored.body, metadata=stored.metadata or None)
        self._writers[run_id] = stored.metadata.get(WRITTEN_BY, "")
        return run

    def _held_run(self, run_id: str) -> Optional[RunObject]:
        """RunLog.json as this process last read or wrote it (so current at some moment before now)."""
        key = self.key(run_id)
        with self._lock():
            held = self._versions.get(key)
        if held is None:
            return None
        try:
            return self._run_object(S3Object(key, held.body, held.etag, "", dict(held.metadata or {})))
        except InvalidRunLogError:
            return None

    def _shows(self, run_id: str, epoch: Epoch, keys: List[str]) -> bool:
        with self._lock():
            known = self._showing.get(self.key(run_id))
        return known is not None and known[0] == epoch and any(key in known[1] for key in keys)

    def _showing_at(self, run_id: str, epoch: Epoch, keys: List[str]) -> None:
        with self._lock():
            known = self._showing.get(self.key(run_id))
            if known is None or known[0] != epoch:
                known = self._showing[self.key(run_id)] = (epoch, set())
            known[1].update(keys)

    def _saw(self, key: str, log: Optional[Mapping[str, Any]]) -> None:
        with self._lock():
            self._shown.pop(key, None)
            if log is not None:
                self._shown[key] = _json_copy(dict(log))
                while len(self._shown) > self._KEEP_VERSIONS:
                    self._shown.pop(next(iter(self._shown)))

    def _changed_parameters(
        self, key: str, container: Callable[[Dict[str, Any]], Dict[str, Any]], parameters: Mapping[str, Any]
    ) -> Dict[str, Any]:
        with self._lock():
            shown = self._shown.get(key)
        if shown is None:
            return super()._changed_parameters(key, container, parameters)
        seen = shown.get("parameters") or {}
        return {name: value for name, value in _json_copy(dict(parameters)).items()
                if name not in seen or seen[name] != value}

    def _stamp(self, stored: Optional[S3Object]) -> Optional[Epoch]:
        return stamp_of(decode_log_object(stored.body, self._url(stored.key))) if stored is not None else None

    def _view(self, name: str, stored: Optional[S3Object], run: RunObject) -> Optional[Dict[str, Any]]:
        """What every reader sees of log object `name` under RunLog.json `run`: own fields, or None."""
        intent = run.intent or {}
        legacy = intent.get("begin")
        if legacy is not None:  # a replacement the previous release committed (no epochs): its own rule
            if stored is None or same_etag(stored.etag, legacy.get(name, "")):
                if name in intent["logs"] or name in legacy:
                    new = intent["logs"].get(name)
                    return dict(new) if new is not None else None  # its new version, or dropped
            if stored is None or self._stamp(stored) is None:  # absent, or its tombstone
                return None
            return public(decode_log_object(stored.body, self._url(stored.key)))
        if stored is not None and compare_epochs(self._stamp(stored), run.epoch) == "same":
            return public(decode_log_object(stored.body, self._url(stored.key)))
        new = (run.intent or {}).get("logs", {}).get(name)
        return dict(new) if new is not None else None

    # Reading.

    def read(self, run_id: str, full: bool = True) -> Dict[str, Any]:
        """The run log: with full, the whole tree as of one moment (a GET and a LIST at once, then concurrent
        GETs); else the run object only (its own fields: a replacement writes them at its commit point)."""
        if not full:
            return public(self._read_run(run_id, self._get_or_none(self.key(run_id))).document)
        return self.read_version(run_id)[0]

    def read_version(self, run_id: str) -> Tuple[Dict[str, Any], str]:
        """The whole run log and its version (see chunked_version): what replace_if_unchanged checks."""
        deadline = self._clock() + self.client.config.conflict_timeout
        rounds = 0
        while True:
            rounds += 1
            tree = self._read_tree(run_id)
            if tree is not None:
                return tree
            if rounds > 1:
                self._next_round(
                    rounds, deadline, self.where(run_id), "it was replaced (put) while being read, every time",
                    doing="reading", remedy="try again when no put is replacing it",
                )

    def _read_tree(self, run_id: str) -> Optional[Tuple[Dict[str, Any], str]]:
        """The run log and its version, or None if a replacement committed while it was read (read it again)."""
        folder, run_key = self.folder(run_id), self.key(run_id)
        pages: List[int] = []
        stored_run, entries = self._at_once(lambda: self._get_or_none(run_key),
                                            lambda: list(self.client.list_objects(folder, pages=pages)))
        if stored_run is not None and is_marker_body(stored_run.body):
            raise self._not_found(run_id, removed=True, left=sum(1 for info in entries if self._kind_of(info.key, folder)))
        if stored_run is None:
            if any(info.key == run_key for info in entries):
                return None  # created since the GET: read again
            count = sum(1 for info in entries if self._kind_of(info.key, folder))
            if count:
                raise InvalidRunLogError(
                    f"{self.where(run_id)} holds {count} objects but no {CHUNK_RUN_OBJECT}: the leftovers of a "
                    f"deleted run or of writes into it; they were left as is (rm {run_id} removes them)"
                )
        run = self._read_run(run_id, stored_run)
        if not self._listing_pinned(pages, entries, run):
            entries = list(self.client.list_objects(folder))
        listed = {info.key: info for info in entries if self._kind_of(info.key, folder)}
        stored = self._held_versions(listed)
        stored.update(self._get_many([key for key in listed if key not in stored]))
        # A log listed and gone, or one of another incarnation: an rm, and perhaps a new run, may have come in
        # between (else it is a deleted run's leftover). If RunLog.json says so now, read again.
        if any(key not in stored for key in listed) or any(
                (self._stamp(found) or run.epoch).incarnation != run.epoch.incarnation for found in stored.values()):
            now = self._get_or_none(run_key)
            latest = self._run_object(now) if now is not None else None
            if latest is None or latest.epoch != run.epoch:
                return None
        intent = run.intent or {}
        positions = {name: number for number, name in enumerate(intent.get("logs", {}))}
        names = {key[len(folder):]: key for key in stored}
        for name in positions:
            names.setdefault(name, folder + name)
        logs: List[Tuple[Tuple[int, str], str, Dict[str, Any]]] = []
        showing = []
        for name, key in names.items():
            found = stored.get(key)
            order = compare_epochs(self._stamp(found), run.epoch) if found is not None else "older"
            if order == "newer":
                return None  # a replacement committed meanwhile: read again
            log = self._view(name, found, run)
            if log is None:
                continue
            if order == "same":
                assert found is not None
                showing.append(key)
                logs.append((_creation_order(found), self._kind_of(key, folder), log))
            else:
                logs.append(((int(intent["created"]) + positions[name], name), self._kind_of(key, folder), log))
        self._showing_at(run_id, run.epoch, showing)
        logs.sort(key=lambda item: item[0])
        # The version of exactly what was read: a later check against RunLog.json and a LIST then fails if
        # anything changed since, even when part of it was read newer than listed.
        version = chunked_version(run.stored.etag, {key[len(folder):]: stored[key].etag for key in stored})
        return assemble_run_log(public(run.document), [log for _o, kind, log in logs if kind == "step"],
                                [log for _o, kind, log in logs if kind == "branch"], self.where(run_id)), version

    @staticmethod
    def _listing_pinned(pages: List[int], entries: List[ObjectInfo], run: RunObject) -> bool:
        # A listing taken alongside RunLog.json's GET shows the folder while that version stood only if it is
        # one page (one moment) and shows its ETag; else it may be from before a commit: list again, after.
        return len(pages) == 1 and any(info.key == run.stored.key and same_etag(info.etag, run.stored.etag)
                                       for info in entries)

    def _held_versions(self, listed: Mapping[str, ObjectInfo]) -> Dict[str, S3Object]:
        # A log listed with the ETag of the version this process holds is those bytes: no GET.
        with self._lock():
            held = {key: self._versions.get(key) for key in listed}
        return {
            key: S3Object(key, version.body, version.etag, listed[key].last_modified, dict(version.metadata or {}))
            for key, version in held.items()
            if version is not None and same_etag(version.etag, listed[key].etag)
        }

    def _read_logs(self, run_id: str, keys: List[str]) -> Tuple[RunObject, Dict[str, Tuple[Optional[S3Object],
                                                                                    Optional[Dict[str, Any]]]]]:
        """RunLog.json and the objects `keys`, read within this call (see "Reads" above): RunLog.json, and for
        each key the object stored and what every reader sees of it (own fields, or None when absent)."""
        run_key, folder = self.key(run_id), self.folder(run_id)
        before = self._held_run(run_id)  # current before this call began
        deadline = self._clock() + self.client.config.conflict_timeout
        rounds = 0
        while True:
            rounds += 1
            found = self._in_pool(self._get_or_none, [run_key] + keys)
            run = self._read_run(run_id, found[0])
            settled = self._settled(before, run)
            views = {}
            for key, stored in zip(keys, found[1:]):
                order = compare_epochs(self._stamp(stored), run.epoch) if stored is not None else "older"
                if order == "same" or (order == "older" and (run.intent is not None or settled)):
                    views[key] = (stored, self._view(key[len(folder):], stored, run))
            if len(views) == len(keys):
                return run, views
            before = run  # read before the next round begins
            if rounds > 1:
                self._next_round(rounds, deadline, self.where(run_id), "it was replaced (put) while being read, "
                                 "every time", doing="reading", remedy="try again when no put is replacing it")

    @staticmethod
    def _settled(before: Optional[RunObject], run: RunObject) -> bool:
        # Whether no roll-forward can have run between a read of RunLog.json finished before this call and
        # one during it: the same epoch, with no intent in either.
        return before is not None and before.epoch == run.epoch and before.intent is None and run.intent is None

    def read_step(self, run_id: str, internal_name: str) -> Dict[str, Any]:
        """A step log's own fields (its branches are their own objects): its GET and RunLog.json's, at once."""
        return self._read_chunk(run_id, "step", internal_name)

    def read_branch(self, run_id: str, internal_name: str) -> Dict[str, Any]:
        """A branch log's own fields, or the run object for '' (the base dag)."""
        if not internal_name:
            return self.read(run_id, full=False)
        return self._read_chunk(run_id, "branch", internal_name)

    def _read_chunk(self, run_id: str, kind: str, internal_name: str) -> Dict[str, Any]:
        key = self.chunk_key(run_id, kind, internal_name)
        run, views = self._read_logs(run_id, [key])
        if views[key][1] is None:
            # Not there: RunLog.json again before saying so. An rm may have committed between the two GETs (it
            # deletes the logs after its marker): then the run is not found; a put: read it as it is now.
            latest = self._read_run(run_id, self._get_or_none(self.key(run_id)))
            if latest.epoch != run.epoch or latest.intent != run.intent:
                run, views = self._read_logs(run_id, [key])
        stored, document = views[key]
        if stored is not None and document is not None and compare_epochs(self._stamp(stored), run.epoch) == "same":
            # A base for the next rewrite (one PUT) and for parameters diffed against it: only when it is what
            # the reader is shown, not an object a replacement under way stands in for.
            self._remember(key, stored.etag, stored.body, metadata=stored.metadata or None)
        else:  # nor a version held from before (this process's own write): parameters are diffed against the view
            self._forget([key])
        self._saw(key, document)
        if document is None:
            raise _log_not_found(kind, internal_name, run_id, self._url(key))
        self._showing_at(run_id, run.epoch, [key])
        document.setdefault(_CHUNK_CHILDREN[kind], {})
        return document

    def _get_many(self, keys: List[str]) -> Dict[str, S3Object]:
        """GET the keys from a bounded pool of threads; a key deleted since the LIST is left out."""
        return {key: result for key, result in zip(keys, self._in_pool(self._get_or_none, keys)) if result is not None}

    def has_objects(self, run_id: str) -> bool:
        """Whether logs are stored under the run's folder (a run, or the leftovers of one)."""
        folder = self.folder(run_id)
        return any(self._kind_of(info.key, folder) for info in self.client.list_objects(folder))

    # Writing.

    def create(self, document: Dict[str, Any]) -> None:
        """Store a new run's object at a new incarnation (over rm's marker, if one is there), with the logs it
        carries at once (one commit point); RunLogExistsError if the run is there. Objects left in its folder
        are of another incarnation: they never show."""
        with _Writing(self.client):
            run_id = document["run_id"]
            check_input(document, "the run log to create")
            logs = self._prepare_logs(run_id, _chunks_of_run(document))
            if logs:
                self._replace(run_id, _run_fields(document), logs, creating=True)
                return
            fields_ = dict(_run_fields(document), **{STORE_FIELD: {"epoch": str(next_epoch(None))}})
            self._create_object(
                self.key(run_id),
                self._encode(fields_),
                lambda: RunLogExistsError(f"a run log for run id {run_id!r} already exists at {self.where(run_id)}"),
                metadata=self._creator_tags(), run_object=True,
            )

    def replace(self, document: Dict[str, Any]) -> None:
        """Replace the run: afterwards it holds exactly `document`'s logs, but for logs that writers
        change while it runs (theirs are newer). Readers see the old run log or the new one, never a mix,
        even if this stops halfway (see the protocol above)."""
        with _Writing(self.client):
            run_id = document["run_id"]
            check_input(document, "the run log to write")
            self._replace(run_id, _run_fields(document), self._prepare_logs(run_id, _chunks_of_run(document)),
                          creating=False)

    def replace_if_unchanged(self, document: Dict[str, Any], etag: str) -> None:
        """Replace the run only if its version is still `etag` (read_version's): PreconditionFailedError if
        any object changed before the check (a GET and a LIST). A log a pipeline writes in the one round
        trip between the check and the commit point is replaced like the others (left open: no LIST and
        PUT can be one request on S3)."""
        with _Writing(self.client):
            run_id = document["run_id"]
            check_input(document, "the run log to write")
            self._replace(run_id, _run_fields(document), self._prepare_logs(run_id, _chunks_of_run(document)),
                          creating=False, expected=etag)

    def check_writable(self, document: Mapping[str, Any]) -> None:
        run_id = document["run_id"]
        _check_write_size(encode_run_log(_run_fields(document)), self._url(self.key(run_id)))
        self._prepare_logs(run_id, _chunks_of_run(document))

    def _prepare_logs(self, run_id: str, chunks: List[Tuple[str, Dict[str, Any]]]) -> Dict[str, Dict[str, Any]]:
        """{object name: own fields} of each log, every key and size checked before anything is written."""
        folder = self.folder(run_id)
        prepared = {}
        for kind, own in chunks:
            key = self.chunk_key(run_id, kind, own.get("internal_name"))
            _check_write_size(encode_run_log(own), self._url(key))
            prepared[key[len(folder):]] = own
        return prepared

    def _replace(self, run_id: str, fields_: Dict[str, Any], logs: Dict[str, Dict[str, Any]], creating: bool,
                 expected: str = "") -> None:
        run_key, folder, where = self.key(run_id), self.folder(run_id), self.where(run_id)
        token = new_token()
        deadline = self._clock() + self.client.config.conflict_timeout
        rounds = 0
        while True:
            rounds += 1
            stored = self._get_or_none(run_key)
            current = self._decode_run(stored.body, self._url(run_key)) if stored is not None else None
            if current is not None and creating:
                raise RunLogExistsError(f"a run log for run id {run_id!r} already exists at {where}")
            if current is not None:
                assert stored is not None
                _require_strong_etag(stored.etag, run_key, self.client)
                if _intent_of(current):  # another replacement committed and has not finished: finish it first
                    self._finish(run_id, current)
                    if not expected:  # (with expected, the check below refuses: the run changed)
                        self._next_round(rounds, deadline, where, "other replacements kept committing",
                                         doing="replacing", remedy="try again when they have finished")
                    continue
            # Listed before the commit point, so older than the epoch it begins: the roll-forward's conditions.
            begin = {info.key[len(folder):]: info.etag for info in self.client.list_objects(folder)
                     if self._kind_of(info.key, folder)}
            if expected and (current is None or stored is None or not same_etag(chunked_version(stored.etag, begin),
                                                                                expected)):
                raise PreconditionFailedError(f"{where} changed since version {expected}; nothing written",
                                              operation="PUT", code="PreconditionFailed", status=412,
                                              bucket=self.client.bucket, key=run_key)
            epoch = next_epoch(current)
            server_now = self.client.server_now()
            intent = {"token": token, "since": server_now or wall_clock(), "created": time.time_ns(), "logs": logs}
            until = window_ends = None
            if current is not None and server_now is not None:  # over a live version: a late commit is void
                until, window_ends = self._commit_window(server_now)
                intent.update(until=until, was=current)
            body = self._encode(dict(fields_, **{STORE_FIELD: {"epoch": str(epoch), "replacing": intent}}))
            _check_write_size(body, self._url(run_key))
            creator = (stored.metadata.get(WRITTEN_BY, "") if current is not None and stored else "") or self.writer
            metadata = {WRITTEN_BY: creator} if creator else None
            try:
                if stored is None:
                    reply = self.client.put_reply(run_key, body, if_none_match=True, metadata=metadata)
                else:  # a live version, or rm's marker
                    reply = self.client.put_reply(run_key, body, if_match=stored.etag, metadata=metadata)
                committed = until is None or self._landed_in_window(reply, until)  # a create, or a 200 in time
                if committed:
                    self._remember(run_key, reply.header("ETag"), body, metadata=metadata)
                else:
                    committed = self._committed(run_key, token)
                reason = "other writers kept changing it"
            except (PreconditionFailedError, NotFoundError) as exc:
                if isinstance(exc, NoSuchBucketError):
                    raise
                # Refused, so no attempt can land any more (RunLog.json changed since the read); if an earlier
                # attempt landed with its reply lost, RunLog.json may be ours.
                committed = getattr(exc, "after_lost_reply", False) and self._committed(run_key, token)
                reason = "other writers kept changing it"
            except RunlogS3Error as exc:
                if window_ends is None or not exc.may_have_landed:
                    raise
                # An attempt may be in the network still: look, and unless it counts, fence it off. With the
                # server out of reach, once the window has passed none can count any more: look then.
                try:
                    committed = self._settle_commit(run_key, token, rounds, deadline)
                except RunlogS3Error:
                    self._wait_until(window_ends)
                    try:
                        committed = self._settle_commit(run_key, token, rounds, deadline)
                    except RunlogS3Error:
                        raise exc from None
                reason = "its commit found no reply (an attempt that lands now is void)"
            if not committed:
                # Refused, void, or ours finished or changed since: replace again (a replacement applied twice
                # leaves the same run), with a new token.
                self.conflicts += 1
                token = new_token()
                self._next_round(rounds, deadline, where, reason, doing="replacing")
                continue
            break
        try:
            self._roll_forward(run_id, epoch, intent, begin)
        except RunlogS3Error as exc:  # committed: readers see the new run log; the next writer finishes it
            logger.warning("%s: replaced; writing its logs failed (%s); the next put or writer finishes it",
                           where, exc)

    def _commit_window(self, server_now: float) -> Tuple[int, float]:
        """A commit's `until` (server clock), and when, by this process's clock, no attempt of it can land
        within the window any more."""
        config = self.client.config
        until = int(server_now + config.connect_timeout + config.read_timeout + COMMIT_MARGIN)
        return until, self._clock() + (until + 1 - server_now)

    @staticmethod
    def _landed_in_window(reply: HttpReply, until: int) -> bool:
        # Its Last-Modified is at most the reply's Date (one clock, whole seconds): in the window if that is.
        date = parse_http_date(reply.header("Date"))
        return date is not None and int(date) <= until

    def _settle_commit(self, run_key: str, token: str, rounds: int, deadline: float) -> bool:
        """After a commit whose reply was lost: whether it counts (see _committed). If not, RunLog.json is
        written again as it reads (a compare-and-swap that changes nothing a reader sees), so that no attempt
        still in the network can land: each carries If-Match on the version before."""
        while True:
            stored = self._get_or_none(run_key)
            document = self._decode_run(stored.body, self._url(run_key)) if stored is not None else None
            if stored is None or document is None:
                return False  # absent, or rm's marker: no attempt's If-Match can hold
            if (_intent_of(document) or {}).get("token") == token:
                self._remember(run_key, stored.etag, stored.body, metadata=stored.metadata or None)
                return True
            try:
                self.client.put_object(run_key, self._encode(document), if_match=stored.etag,
                                       metadata=stored.metadata or None)
                return False
            except PreconditionFailedError:
                rounds += 1  # written meanwhile, perhaps by an attempt of ours: look again
                self._next_round(rounds, deadline, self._url(run_key), "other writers kept changing it",
                                 doing="replacing")

    def _wait_until(self, moment: float) -> None:
        time.sleep(max(0.0, moment - self._clock()))

    def _committed(self, run_key: str, token: str) -> bool:
        """Whether a replacement's commit counts (see "Late commits"): a GET shows its intent, in its own
        version (not void) or in one written over it. That version is then the one held."""
        stored = self._get_or_none(run_key)
        document = self._decode_run(stored.body, self._url(run_key)) if stored is not None else None
        if stored is None or document is None or (_intent_of(document) or {}).get("token") != token:
            return False
        self._remember(run_key, stored.etag, stored.body, metadata=stored.metadata or None)
        return True

    def _finish(self, run_id: str, run_object: Mapping[str, Any]) -> None:
        """Roll forward a replacement another writer committed and left unfinished, then clear its intent."""
        intent = _intent_of(run_object)
        if intent is not None:
            self._roll_forward(run_id, epoch_of(run_object), intent, None)

    def _roll_forward(self, run_id: str, epoch: Epoch, intent: Mapping[str, Any],
                      begin: Optional[Mapping[str, str]]) -> None:
        """Write each log of a committed replacement stamped with its epoch where an older object (or none)
        stands, then clear its intent (see "Roll forward" above). `begin`: the ETags its writer listed before
        the commit point (older for sure); None for another writer's, whose objects are read first."""
        folder, token, logs = self.folder(run_id), intent["token"], intent["logs"]
        order = {name: number for number, name in enumerate(logs)}
        todo = list(logs)
        legacy = intent.get("begin")
        if legacy is not None:  # the previous release's: each log If-Match as its writer listed, the dropped
            begin, todo = legacy, sorted(set(logs) | set(legacy))  # ones as tombstones; a 412 leaves a newer write
        elif begin is None:
            listed = {info.key[len(folder):] for info in self.client.list_objects(folder)}
            found = self._get_many([folder + name for name in logs if name in listed])
            begin = {}
            for name in logs:
                stored = found.get(folder + name)
                if stored is not None and compare_epochs(self._stamp(stored), epoch) != "older":
                    todo.remove(name)  # rolled forward already, or written since at this epoch (or later)
                elif stored is not None and self._may_overwrite(run_id, stored, epoch):
                    begin = {**begin, name: stored.etag}
                elif stored is not None:
                    todo.remove(name)  # of an incarnation that replaced this one: not ours to touch

        def roll_forward(name: str) -> None:
            key = folder + name
            if name in logs:
                body = self._encode(_stamped(logs[name], epoch))
                metadata = {_CREATED: str(int(intent["created"]) + order[name])}
            else:  # dropped by a legacy replacement: its tombstone
                internal_name = urllib.parse.unquote(name[name.index("-") + 1:-len(RUN_LOG_SUFFIX)])
                body, metadata = self._encode({"internal_name": internal_name, STORE_FIELD: {"removed_by": token}}), {}
            condition = begin.get(name, "")
            for _attempt in range(8):  # each 412 means another write landed in between: rare, and bounded
                try:
                    etag = self.client.put_object(key, body, if_match=condition, metadata=metadata) if condition else (
                        self.client.put_object(key, body, if_none_match=True, metadata=metadata))
                except PreconditionFailedError:
                    now = self._get_or_none(key)
                    if now is None:
                        condition = ""
                        continue
                    if now.body == body:
                        return  # ours, its reply lost
                    if compare_epochs(self._stamp(now), epoch) != "older" or not self._may_overwrite(run_id, now, epoch):
                        return  # a newer write stands: it stays
                    condition = now.etag
                    continue
                except NotFoundError as exc:
                    if isinstance(exc, NoSuchBucketError):
                        raise
                    # Deleted since: by an rm of the run before, under a create over its marker (the log is
                    # ours to write), or of this run (stamped with its epoch, the log never shows).
                    condition = ""
                    continue
                self._remember(key, etag, body, metadata=metadata)
                return
            raise ConflictError(f"{self._url(key)}: other writers kept changing it while a replacement was rolled "
                                "forward; the replacement stays committed (readers see it whole); the next writer "
                                "finishes it")

        self._in_pool(roll_forward, todo)

        def clear(run_object: Dict[str, Any]) -> None:
            if (_intent_of(run_object) or {}).get("token") == token:
                del run_object[STORE_FIELD]["replacing"]

        try:
            self._mutate_object(self.key(run_id), clear, self._decode_run, lambda: self._not_found(run_id))
        except RunLogNotFoundError:
            pass  # deleted since (rm): nothing left to clear

    def _may_overwrite(self, run_id: str, stored: S3Object, epoch: Epoch) -> bool:
        """The writer's rule: whether a write stamped `epoch` may replace `stored` (stamped the same or older;
        one of another incarnation only if RunLog.json, read now, is still of `epoch`'s)."""
        stamp = self._stamp(stored)
        if compare_epochs(stamp, epoch) == "newer":
            return False
        if stamp is None or stamp.incarnation == epoch.incarnation:
            return True
        now = self._get_or_none(self.key(run_id))
        run = self._run_object(now) if now is not None else None
        return run is not None and run.epoch.incarnation == epoch.incarnation

    def read_run_object(self, run_id: str) -> Tuple[Dict[str, Any], str]:
        """RunLog.json (the run's own fields) and its ETag: one GET."""
        run = self._read_run(run_id, self._get_or_none(self.key(run_id)))
        return public(run.document), run.stored.etag

    def unfinished_replacement(self, run_id: str) -> str:
        """The token of a replacement committed and not yet finished ('' when none): one GET."""
        stored = self._get_or_none(self.key(run_id))
        run = self._run_object(stored) if stored is not None else None
        return str((run.intent or {}).get("token", "")) if run is not None else ""

    def mutate(self, run_id: str, change: Callable[[Dict[str, Any]], Any]) -> Dict[str, Any]:
        """A compare-and-swap of the run object; a replacement found there unfinished after
        REPLACEMENT_GRACE (its writer stopped) is finished."""
        with _Writing(self.client):
            document = super().mutate(run_id, change)
            intent = _intent_of(document)
            if intent is not None:
                now = self.client.server_now() or wall_clock()
                if now - float(intent.get("since") or 0) > REPLACEMENT_GRACE:
                    logger.info("%s: finishing a replacement its writer left unfinished", self.where(run_id))
                    self._finish(run_id, document)
            return document

    def add_step(self, run_id: str, step_log: Mapping[str, Any]) -> None:
        """Set a step log's object (one round trip when this process knows its branch); logs it carries are
        added if absent. A step in a branch needs that branch (BranchLogNotFoundError, as the frameworks raise)."""
        self._add_step_or_branch(run_id, "step", step_log)

    def add_branch(self, run_id: str, branch_log: Mapping[str, Any]) -> None:
        """Set a branch log's object; logs it carries are added if absent. It needs a step to belong to."""
        self._add_step_or_branch(run_id, "branch", branch_log)

    def _add_step_or_branch(self, run_id: str, kind: str, log: Mapping[str, Any]) -> None:
        with _Writing(self.client):
            own = _own_fields(kind, log)
            self.chunk_key(run_id, kind, own.get("internal_name"))
            children = self._prepare_logs(run_id, list(_chunks_under(kind, log)))
            run = self._write_log(run_id, kind, own)
            self._add_logs(run_id, children, run)

    def _parent_keys(self, run_id: str, kind: str, internal_name: str) -> List[str]:
        # A step's branch; a branch's step (a name with dots may have several candidates, longest first).
        if kind == "step":
            parent = internal_name.rpartition(".")[0]
            return [self.chunk_key(run_id, "branch", parent)] if parent else []
        return [self.chunk_key(run_id, "step", name) for name in _parent_names(internal_name)]

    def _write_log(self, run_id: str, kind: str, own: Dict[str, Any]) -> RunObject:
        """Set a log's object, whatever was stored (see "Writes of a log" above); returns RunLog.json as read
        within this call. The parent is checked on every write, not only on creation: a rewrite of a child
        whose parent a committed put dropped would be acknowledged, never shown."""
        key = self.chunk_key(run_id, kind, own["internal_name"])
        parents = self._parent_keys(run_id, kind, own["internal_name"])
        before = self._held_run(run_id)
        # A log that shows at an epoch was written while its parent showed, which shows for all of it: so
        # while that epoch stands, a parent (or the log itself) known to show needs no GET.
        known = before is not None and bool(parents) and self._shows(run_id, before.epoch, parents + [key])
        deadline = self._clock() + self.client.config.conflict_timeout
        rounds, found = 0, None
        while True:
            rounds += 1
            # RunLog.json before the PUT: a put that commits after this read orders this write before it
            # (stamped older, it never shows); one read alongside the PUT could not tell a put committed
            # before this call began (write again) from one committed while it landed and showed (do not).
            checked = [] if known else parents
            run, views = self._read_logs(run_id, checked)
            if known and not self._shows(run_id, run.epoch, parents + [key]):
                known = False  # a replacement committed since: the parent may be gone
                continue
            shown = [parent for parent in checked if views[parent][1] is not None]
            if checked and not shown:
                missing = "branch" if kind == "step" else "step"
                name = own["internal_name"].rpartition(".")[0] if kind == "step" else next(
                    _parent_names(own["internal_name"]), "")
                raise LogNotFoundError(
                    f"{missing} log {name!r} is not in run log {run_id!r}: {kind} log {own['internal_name']!r} has "
                    f"no {missing} to belong to; add the {missing} log first", kind=missing,
                )
            self._showing_at(run_id, run.epoch, shown)
            base: Optional[Union[_Version, S3Object]] = found if found is not None else self._held_base(key, run.epoch)
            if found is not None and not self._may_overwrite(run_id, found, run.epoch):
                found = None
                self._next_round(rounds, deadline, self._url(key), "it was replaced (put) while being written")
                continue
            body = self._encode(_stamped(own, run.epoch))
            _check_write_size(body, self._url(key))
            metadata = (dict(base.metadata or {}) if base is not None and (base.metadata or {}).get(_CREATED)
                        else {_CREATED: str(time.time_ns())})
            try:
                etag = self._put_log(key, body, base.etag if base is not None else "", metadata)
            except (PreconditionFailedError, NotFoundError) as exc:
                if isinstance(exc, NoSuchBucketError):
                    raise
                self._forget([key])
                found = self._get_or_none(key)  # written by another (or there already): the base next round
                if rounds > 1:
                    self.conflicts += 1
                    self._next_round(rounds, deadline, self._url(key), "other writers kept changing it")
                continue
            self._remember(key, etag, body, metadata=metadata)
            self._showing_at(run_id, run.epoch, [key])
            self._saw(key, own)
            return run

    def _held_base(self, key: str, epoch: Epoch) -> Optional[_Version]:
        # The version of a log this process holds, if a write stamped `epoch` may replace it (the writer's rule).
        with self._lock():
            held = self._versions.get(key)
        if held is None:
            return None
        try:
            stamp = stamp_of(decode_log_object(held.body, self._url(key)))
        except InvalidRunLogError:
            return None
        return held if stamp is not None and stamp.incarnation == epoch.incarnation and stamp <= epoch else None

    def _put_log(self, key: str, body: bytes, if_match: str, metadata: Mapping[str, str]) -> str:
        """PUT a log object If-Match `if_match` (If-None-Match when ''); its ETag. A 412 after a lost reply
        that finds these bytes stored is this write's own."""
        try:
            if if_match:
                return self.client.put_object(key, body, if_match=if_match, metadata=metadata)
            return self.client.put_object(key, body, if_none_match=True, metadata=metadata)
        except PreconditionFailedError as exc:
            stored = self._get_or_none(key) if exc.after_lost_reply else None
            if stored is None or stored.body != body:
                raise
            return stored.etag

    def _add_logs(self, run_id: str, logs: Dict[str, Dict[str, Any]], run: Union[RunObject, Mapping[str, Any]]
                  ) -> None:
        # Logs a parent carries are added where none shows, stamped with the epoch read in this call: a write
        # of a parent never undoes a child.
        if isinstance(run, Mapping):
            run = RunObject(S3Object(self.key(run_id), b"", ""), dict(run), epoch_of(run), _intent_of(run))
        folder, first = self.folder(run_id), time.time_ns()

        def add(numbered: Tuple[int, str]) -> None:
            number, name = numbered
            key, metadata = folder + name, {_CREATED: str(first + number)}
            if self._view(name, None, run) is not None:
                return  # a committed replacement's own log shows there (its roll-forward writes it)
            body = self._encode(_stamped(logs[name], run.epoch))
            if self._create_object(key, body, None, metadata=metadata):
                return
            stored = self._get_or_none(key)  # there: it stays if it shows; an older one is absent
            if stored is None or self._view(name, stored, run) is not None or not self._may_overwrite(
                    run_id, stored, run.epoch):
                return
            try:
                self._remember(key, self.client.put_object(key, body, if_match=stored.etag, metadata=metadata),
                               body, metadata=metadata)
            except PreconditionFailedError:
                pass  # written meanwhile: that log stays

        self._in_pool(add, list(enumerate(logs)))

    def set_branch_parameters(self, run_id: str, internal_name: str, parameters: Mapping[str, Any]) -> None:
        """Add or overwrite the parameters of a branch: a compare-and-swap of the branch's object, applied
        to the branch as every reader sees it, stamped with the epoch read with it."""
        with _Writing(self.client):
            if not internal_name:
                self.set_parameters(run_id, parameters)
                return
            key = self.chunk_key(run_id, "branch", internal_name)
            changed = self._changed_parameters(key, lambda document: document, parameters)
            if not changed:
                return
            deadline = self._clock() + self.client.config.conflict_timeout
            rounds = 0
            while True:
                rounds += 1
                run, views = self._read_logs(run_id, [key])
                stored, branch = views[key]
                if branch is None:
                    raise _log_not_found("branch", internal_name, run_id, self._url(key))
                if stored is not None and not self._may_overwrite(run_id, stored, run.epoch):
                    self._next_round(rounds, deadline, self._url(key), "it was replaced (put) while being written")
                    continue
                update_parameters(branch, changed)
                body = self._encode(_stamped(branch, run.epoch))
                _check_write_size(body, self._url(key))
                metadata = dict(stored.metadata) if stored is not None else {_CREATED: str(time.time_ns())}
                if stored is not None:
                    _require_strong_etag(stored.etag, key, self.client)
                try:
                    etag = self._put_log(key, body, stored.etag if stored is not None else "", metadata)
                except (PreconditionFailedError, NotFoundError) as exc:
                    if isinstance(exc, NoSuchBucketError):
                        raise
                    self.conflicts += 1
                    self._next_round(rounds, deadline, self._url(key), "other writers kept changing it")
                    continue
                self._remember(key, etag, body, metadata=metadata)
                self._showing_at(run_id, run.epoch, [key])
                self._saw(key, branch)
                return

    def set_run_fields(self, run_id: str, run_log: Mapping[str, Any]) -> None:
        """put_run_log: the run's own fields; its parameters and run config gain only what is new; logs it
        carries are added where absent, stored ones kept. A run not created yet is created with them."""
        with _Writing(self.client):
            fields_ = {name: value for name, value in run_log.items() if name != "steps"}
            logs = self._prepare_logs(run_id, _chunks_of_run(run_log))
            try:
                stored = self.mutate(run_id, lambda document: put_run_fields(document, fields_))
            except RunLogNotFoundError:
                try:
                    self.create(dict(run_log))
                    return
                except RunLogExistsError:
                    stored = self.mutate(run_id, lambda document: put_run_fields(document, fields_))
            self._add_logs(run_id, logs, stored)

    def delete(self, run_id: str, if_match: str = "", marker: bool = True) -> int:
        """Delete the run: its own object becomes rm's marker first (the commit point: readers find no run at
        once, and a write of it still in the network cannot bring it back), then its logs are deleted (what a
        failed rm, or a late writer, leaves never shows and is removed by the next rm). With if_match, only if
        the run object is still that version (PreconditionFailedError otherwise, nothing deleted)."""
        with _Writing(self.client):
            folder, run_key = self.folder(run_id), self.key(run_id)
            stored = self._get_or_none(run_key)
            live = stored is not None and not is_marker_body(stored.body)
            # Listed before the commit point: only the logs of the run deleted (or leftovers) are deleted, each
            # If-Match as listed; a new run created with this id after the marker writes other bytes.
            listed = {info.key: info.etag for info in self.client.list_objects(folder) if info.key != run_key}
            if live:
                assert stored is not None
                self.remove_run_object(run_id, if_match or stored.etag, marker)
            elif not listed:
                raise self._not_found(run_id, removed=stored is not None)
            elif self._live_again(run_key):  # leftovers, unless a new run came in before the LIST (its logs listed)
                raise ConflictError(f"{self.where(run_id)}: a run was created with this id while rm ran; "
                                        f"nothing deleted; rm {run_id} again to delete it")
            others = list(listed)
            deleted = self._in_pool(lambda key: self._delete_if_unchanged(key, listed[key]), others)
            if live:  # logs of the run written between the LIST and the marker: listed now, stamped with its I
                assert stored is not None
                run = self._run_object(stored)
                incarnation = run.epoch.incarnation if run is not None else "-"
                late = [info.key for info in self.client.list_objects(folder)
                        if info.key != run_key and info.key not in listed and self._kind_of(info.key, folder)]
                found = self._get_many(late)
                ours = {key: log.etag for key, log in found.items()
                        if (self._stamp(log) or Epoch("-", 0)).incarnation == incarnation}
                listed.update(ours)
                others += list(ours)
                deleted += self._in_pool(lambda key: self._delete_if_unchanged(key, ours[key]), list(ours))
            kept = [key for key, done in zip(others, deleted) if not done]
            self._forget(others + [run_key])
            with self._lock():
                self._showing.pop(run_key, None)
                for key in others:
                    self._shown.pop(key, None)
            if kept and self._live_again(run_key):
                return len(listed) + live - len(kept)  # written by a run created with this id since the marker
            if kept:
                raise ConflictError(
                    f"{self.where(run_id)}: {len(kept)} of its objects were written while rm ran and were kept (a "
                    f"pipeline still writing it?); they never show; rm {run_id} again to delete them")
            return len(listed) + live

    def runs_in(self, entries: List[ObjectInfo]) -> List[ObjectInfo]:
        """The chunked runs in a top-level listing (a folder holding RunLog.json or a log object: the
        leftovers of a run are listed too), each folder's objects counted and sized (one LIST each)."""
        prefix = self._list_prefix()
        folders = [info.key for info in entries if info.key.endswith("/") and not info.size and not info.etag]

        def summary(folder: str) -> Optional[ObjectInfo]:
            objects = list(self.client.list_objects(folder))
            if not any(info.key == folder + CHUNK_RUN_OBJECT or self._kind_of(info.key, folder) for info in objects):
                return None  # a folder, but not a run of this layout
            return ObjectInfo(
                folder[len(prefix):-1],
                sum(info.size for info in objects),
                "",
                max(info.last_modified for info in objects),
                len(objects),
            )

        runs = [run for run in self._in_pool(summary, folders) if run is not None]
        return sorted(runs, key=lambda run: (run.last_modified, run.key))

    def _live_again(self, run_key: str) -> bool:
        now = self._get_or_none(run_key)
        return now is not None and not is_marker_body(now.body)

    def _at_once(self, *calls: Callable[[], Any], errors: bool = False) -> List[Any]:
        """The calls' results, their requests sent at once (one round trip); with errors, an S3 error a call
        raised is its result (else it is raised)."""
        def call(function: Callable[[], Any]) -> Any:
            try:
                return function()
            except RunlogS3Error as exc:
                if not errors:
                    raise
                return exc

        return self._in_pool(call, list(calls))

    @staticmethod
    def _in_pool(function: Callable[[Any], Any], items: List[Any]) -> List[Any]:
        if len(items) <= 1:
            return [function(item) for item in items]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=min(ASSEMBLY_THREADS, len(items))) as pool:
            return list(pool.map(function, items))


def _log_not_found(kind: str, internal_name: str, run_id: str, where: str) -> LogNotFoundError:
    return LogNotFoundError(f"{kind} log {internal_name!r} is not in run log {run_id!r} ({where})", kind=kind)


def unfinished_replacement(run_logs: S3RunLogs, run_id: str) -> str:
    """The token of a chunked run's replacement committed but not finished ('' for none, or the s3 layout)."""
    return run_logs.unfinished_replacement(run_id) if isinstance(run_logs, ChunkedS3RunLogs) else ""


def _creation_order(stored: S3Object) -> Tuple[int, str]:
    """Chunks are assembled in the order they were created (the s3 layout keeps insertion order too);
    an object without the metadata falls back to its last-modified time."""
    created = stored.metadata.get(_CREATED, "")
    if created.isdigit():
        return int(created), stored.key
    modified = parse_http_date(stored.last_modified)
    return (int(modified * 1e9) if modified is not None else 0), stored.key


def _run_fields(document: Mapping[str, Any]) -> Dict[str, Any]:
    """The run object of the chunked layout: the run log without its steps."""
    return _json_copy({name: value for name, value in document.items() if name not in ("steps", STORE_FIELD)})


def _chunks_of_run(document: Mapping[str, Any]) -> List[Tuple[str, Dict[str, Any]]]:
    chunks: List[Tuple[str, Dict[str, Any]]] = []
    for step in (document.get("steps") or {}).values():
        chunks.append(("step", _own_fields("step", step)))
        chunks.extend(_chunks_under("step", step))
    return chunks


LAYOUTS = {"s3": S3RunLogs, "chunked-s3": ChunkedS3RunLogs}


def open_run_logs(config: Mapping[str, Any] | Config, layout: str = "s3", **client_options: Any) -> S3RunLogs:
    """The run logs of a layout ('s3' or 'chunked-s3') for a config block (dict or Config)."""
    if not isinstance(config, Config):
        config = Config.from_dict(config)
    return LAYOUTS[layout](S3Client(config, **client_options))


# Framework stores #################################################################################
#
# One class per layout and framework: magnus 0.4 (plain classes), magnus 0.5 and runnable (pydantic
# models whose fields are the config keys). They are a few lines each on a layout's run logs above.
# magnus and runnable check isinstance(store, BaseRunLogStore), so each class subclasses its
# framework's base class. Importing a framework costs a second of pydantic and stevedore, which the
# command line must not pay, so the classes are built on first use (module __getattr__, PEP 562) for
# the framework that asks: the one already imported, else the first installed of runnable, magnus.


class _StoreCore:
    """What the stores of every framework share: a layout's run logs made on first use, and our errors
    raised as the framework's own (which it catches)."""

    _layout: ClassVar[type] = S3RunLogs
    _errors: ClassVar[Dict[str, Any]] = {}  # the framework's exception classes, by name; set per framework
    framework: ClassVar[str] = ""  # "magnus 0.5.1": tagged on the runs this store creates
    if TYPE_CHECKING:  # set by each kind of store; not annotations at run time, which pydantic takes as fields
        config: Config
        _run_logs: Optional[S3RunLogs]

    @property
    def run_logs(self) -> S3RunLogs:
        """The run logs behind this store, made on first use (the client is fork-safe)."""
        if self._run_logs is None:
            self._run_logs = self._layout(S3Client(self.config))
            self._run_logs.writer = self.framework
        return self._run_logs

    def get_aws_credentials_file(self) -> str:
        """The shared credentials file (the local-container integrations mount it)."""
        return os.path.expanduser(self.config.aws_credentials_file)

    def _call(self, run_id: str, operation: Callable[..., Any], *args: Any, missing: Tuple[str, str] = ("", "")) -> Any:
        # Our errors become the framework's own, keeping our message. `missing` is what the framework's
        # base class raises when a log this operation needs is not there: its error's name and the name
        # of the log it reports (a step's branch for add_step_log, a branch's step for add_branch_log).
        error: RunlogS3Error
        error_args: Tuple[str, ...]
        try:
            return operation(*args)
        except RunLogNotFoundError as exc:
            error, error_args = exc, ("RunLogNotFoundError", run_id)
        except RunLogExistsError as exc:
            error, error_args = exc, ("RunLogExistsError", run_id)
        except LogNotFoundError as exc:
            error, error_args = exc, (missing[0] or "BranchLogNotFoundError", run_id, missing[1])
        framework_error = self._errors.get(error_args[0])
        if framework_error is None:
            raise error
        raise framework_error(error.message, *error_args[1:]) from error


def say_config_errors_last() -> None:
    """Make a failed run end with our config error when a framework wrapped it in its own: magnus 0.4 and
    runnable build the store inside `except Exception: raise Exception("Could not find the service of
    ...")`, so a mistyped key ended 50 lines below our message, under their misleading one. At exit,
    after the traceback (whoever printed it: Python, or typer's rich handler in runnable), our line is
    printed again, last. Registered once, when a store's config is refused; nothing is printed when the
    error was handled, or when the traceback already ends with ours."""
    import atexit

    atexit.unregister(_say_config_error_last)  # once, however many stores were refused
    atexit.register(_say_config_error_last)


def _say_config_error_last() -> None:
    ended = getattr(sys, "last_value", None)  # the exception that ended the program, set as it was printed
    if ended is None or isinstance(ended, RunlogS3Error):
        return  # no uncaught exception, or its traceback ends with ours already
    cause: Optional[BaseException] = ended.__cause__ or ended.__context__
    for _ in range(20):  # a chain is short; one that loops must not hang the exit
        if cause is None:
            return
        if isinstance(cause, ConfigError):
            print(f"runlog-s3: error: {cause.message}", file=sys.stderr, flush=True)
            return
        cause = cause.__cause__ or cause.__context__


def _framework_errors(exceptions: Any, names: Tuple[str, ...]) -> Dict[str, type]:
    """The framework's exception classes, each also one of ours: made with the framework's arguments (so
    it has the framework's attributes: run_id, step_name, branch_name), carrying our message."""
    ours = {"RunLogNotFoundError": RunLogNotFoundError, "RunLogExistsError": RunLogExistsError,
            "StepLogNotFoundError": LogNotFoundError, "BranchLogNotFoundError": LogNotFoundError,
            "JobLogNotFoundError": LogNotFoundError}

    def error_class(name: str) -> type:
        theirs = getattr(exceptions, name)

        def __init__(self: Any, message: str, *args: Any) -> None:
            theirs.__init__(self, *args)  # sets the attributes the framework's callers read
            RunlogS3Error.__init__(self, message)

        return type(name, (ours[name], theirs), {"__init__": __init__, "__module__": __name__})

    return {name: error_class(name) for name in names}


def _installed_version(distribution: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return "?"


class _MagnusStoreMethods(_StoreCore):
    """The magnus run log store interface (0.4 and 0.5 share it), on a layout's run logs: every update is
    a compare-and-swap. Each framework section says how its models become dicts and back."""

    def _model(self, kind: str, document: Dict[str, Any]) -> Any:
        raise NotImplementedError

    def _as_dict(self, log: Any) -> Dict[str, Any]:
        raise NotImplementedError

    def create_run_log(
        self,
        run_id: str,
        dag_hash: str = "",
        use_cached: bool = False,
        tag: str = "",
        original_run_id: str = "",
        status: str = "CREATED",
        **kwargs: Any,
    ) -> Any:
        """Create the run log with If-None-Match: *; raises RunLogExistsError when one is there."""
        run_log = self._model("RunLog", dict(
            run_id=validate_run_id(run_id),
            dag_hash=dag_hash,
            use_cached=use_cached,
            tag=tag,
            original_run_id=original_run_id,
            status=status,
        ))
        self._call(run_id, self.run_logs.create, self._as_dict(run_log))
        return run_log

    def get_run_log_by_id(self, run_id: str, full: bool = False, **kwargs: Any) -> Any:
        """The run log, read fresh: one GET for `s3`; for `chunked-s3` the run object, or with full
        the whole tree (one LIST and concurrent GETs)."""
        return self._model("RunLog", self._call(run_id, self.run_logs.read, run_id, full))

    def put_run_log(self, run_log: Any, **kwargs: Any) -> None:
        """Set the run's own fields (status, tag, ...): its logs, parameters and run config are kept, logs
        it carries added where absent, as the frameworks' chunked stores do (a run read without full=False
        and put back keeps its history). A run not created yet is created. A whole-run replacement is the
        command line's `put --force`."""
        run_log = self._as_dict(run_log)
        self._call(run_log["run_id"], self.run_logs.set_run_fields, run_log["run_id"], run_log)

    def update_run_log_status(self, run_id: str, status: str) -> None:
        """Set the run's status."""
        self._call(run_id, self.run_logs.set_status, run_id, status)

    def get_parameters(self, run_id: str, **kwargs: Any) -> dict:
        """The run's parameters."""
        return self._call(run_id, self.run_logs.read, run_id, False).get("parameters", {})

    def set_parameters(self, run_id: str, parameters: dict, **kwargs: Any) -> None:
        """Add or overwrite parameters."""
        self._call(run_id, self.run_logs.set_parameters, run_id, parameters)

    def get_run_config(self, run_id: str, **kwargs: Any) -> dict:
        """The run config of the run."""
        return self._call(run_id, self.run_logs.read, run_id, False).get("run_config", {})

    def set_run_config(self, run_id: str, run_config: dict, **kwargs: Any) -> None:
        """Add or overwrite run config entries."""
        self._call(run_id, self.run_logs.set_run_config, run_id, run_config)

    def get_step_log(self, internal_name: str, run_id: str, **kwargs: Any) -> Any:
        """A step log by its internal name."""
        step = self._call(run_id, self.run_logs.read_step, run_id, internal_name,
                          missing=("StepLogNotFoundError", internal_name))
        return self._model("StepLog", step)

    def add_step_log(self, step_log: Any, run_id: str, **kwargs: Any) -> None:
        """Set a step log in its branch; branches stored under it by other writers are kept."""
        step = self._as_dict(step_log)
        logger.debug("add step log %s to run %s", step.get("internal_name"), run_id)
        branch_name = str(step.get("internal_name", "")).rpartition(".")[0]
        self._call(run_id, self.run_logs.add_step, run_id, step, missing=("BranchLogNotFoundError", branch_name))

    def get_branch_log(self, internal_branch_name: str, run_id: str, **kwargs: Any) -> Any:
        """A branch log by its internal name, or the run log for '' (the base dag)."""
        log = self._call(run_id, self.run_logs.read_branch, run_id, internal_branch_name,
                         missing=("BranchLogNotFoundError", internal_branch_name))
        return self._model("BranchLog" if internal_branch_name else "RunLog", log)

    def add_branch_log(self, branch_log: Any, run_id: str, **kwargs: Any) -> None:
        """Set a branch log in its step; for a run log (the base dag) set the run's own fields, storing the
        run if it is not there yet (the frameworks' base classes put_run_log it)."""
        branch = self._as_dict(branch_log)
        if "run_id" in branch:
            self._call(run_id, self.run_logs.set_run_fields, run_id, branch)  # creates a run not created yet
        else:
            step_name = str(branch.get("internal_name", "")).rpartition(".")[0]
            self._call(run_id, self.run_logs.add_branch, run_id, branch, missing=("StepLogNotFoundError", step_name))


def _store_classes(methods: type, base: type, framework: str, **attributes: Any) -> Dict[str, type]:
    """A framework's two store classes: `methods` on its `base`, one per layout, with the framework's
    models and errors (`attributes`) and its name and version, which each run they create is tagged with."""

    class S3RunLogStore(methods, base):
        """Run log store `type: s3`: one JSON object per run, every update a compare-and-swap."""

        service_name: str = SERVICE_NAMES["S3RunLogStore"]

    class ChunkedS3RunLogStore(methods, base):
        """Run log store `type: chunked-s3`: one object per step and branch log, for wide fan-outs."""

        service_name: str = SERVICE_NAMES["ChunkedS3RunLogStore"]
        _layout = ChunkedS3RunLogs

    for store in (S3RunLogStore, ChunkedS3RunLogStore):
        for name, value in {"framework": framework, **attributes}.items():
            type.__setattr__(store, name, value)  # past pydantic's class attribute checks: class variables
        store.__qualname__ = store.__name__  # pickled by reference: runlog_s3.S3RunLogStore
    return {"S3RunLogStore": S3RunLogStore, "ChunkedS3RunLogStore": ChunkedS3RunLogStore}


# Without a framework: the same interface on plain dicts, for scripts and for the tests. ###########


class _PlainStoreMethods(_MagnusStoreMethods):
    """The magnus 0.4 interface on plain dicts: a store to script against without magnus."""

    def __init__(self, config: Optional[Mapping[str, Any]] = None):
        try:
            self.config = Config.from_dict(config)
        except ConfigError:
            say_config_errors_last()
            raise
        self._run_logs = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(bucket={self.config.s3_bucket!r}, prefix={self.config.key_prefix!r})"

    def _model(self, kind: str, document: Dict[str, Any]) -> Any:
        if kind == "RunLog":
            document = {"steps": {}, "parameters": {}, "run_config": {}, **document}
        return document

    def _as_dict(self, log: Any) -> Dict[str, Any]:
        return dict(log)

    def create_step_log(self, name: str, internal_name: str, **kwargs: Any) -> Any:
        """An uncommitted step log."""
        return dict(name=name, internal_name=internal_name, status="CREATED", branches={})

    def create_branch_log(self, internal_branch_name: str, **kwargs: Any) -> Any:
        """An uncommitted branch log."""
        return dict(internal_name=internal_branch_name, status="CREATED", steps={})


def _build_plain_stores() -> Dict[str, type]:
    return _store_classes(_PlainStoreMethods, object, "")


# magnus 0.4 #######################################################################################
#
# `run_log_store: {type: s3, config: {...}}`: magnus 0.4 passes the config block as one dict, and its
# models are pydantic 1 (`.dict()`, `Model(**fields)`).


class _Magnus04StoreMethods(_PlainStoreMethods):
    """magnus 0.4's store: magnus's models and errors on the plain interface."""

    _models: ClassVar[Dict[str, Any]] = {}  # RunLog, StepLog, BranchLog of magnus.datastore

    def _model(self, kind: str, document: Dict[str, Any]) -> Any:
        return self._models[kind](**document)

    def _as_dict(self, log: Any) -> Dict[str, Any]:
        return log.dict()


def _build_magnus04_stores() -> Dict[str, type]:
    """S3RunLogStore and ChunkedS3RunLogStore for magnus 0.4, subclassing its BaseRunLogStore."""
    from magnus import datastore, exceptions

    base = datastore.BaseRunLogStore
    return _store_classes(
        _Magnus04StoreMethods, base, f"magnus {_installed_version('magnus')}",
        _models={"RunLog": datastore.RunLog, "StepLog": datastore.StepLog, "BranchLog": datastore.BranchLog},
        _errors=_framework_errors(exceptions, MAGNUS_ERRORS),
        create_step_log=base.create_step_log,  # magnus's own factories build its models
        create_branch_log=base.create_branch_log,
    )


MAGNUS_ERRORS = ("RunLogNotFoundError", "RunLogExistsError", "StepLogNotFoundError", "BranchLogNotFoundError")


# Stores that are pydantic models (magnus 0.5, runnable) ###########################################
#
# The framework calls Store(**config): each config key is a field. Our own check of the keys runs
# first, so a mistake is our one-line ConfigError, not a pydantic report. The client is a private
# attribute, dropped when the store is pickled (runnable sends its context to a process pool).


def config_from_store_fields(values: Mapping[str, Any]) -> Config:
    """The Config of a store's keyword arguments."""
    values = dict(values)
    for name in ("service_name", "service_type", "supports_parallel_writes"):
        values.pop(name, None)  # the base class's fields: given back when a store is copied
    return Config.from_dict(with_runnable_spelling(values))


def with_runnable_spelling(values: Mapping[str, Any]) -> Dict[str, Any]:
    """A config block with runnable's spelling of the bucket (its minio stores take `bucket`, as `name`
    or `name/prefix`) turned into s3_bucket and prefix."""
    values = dict(values)
    if "bucket" in values:
        if values.get("s3_bucket"):
            raise ConfigError("run_log_store config has both bucket and s3_bucket: keep one")
        bucket, _, prefix = str(values.pop("bucket") or "").partition("/")
        if prefix and values.get("prefix"):
            raise ConfigError(f"bucket {bucket + '/' + prefix!r} holds a prefix and prefix is set too: keep one")
        values["s3_bucket"] = bucket
        if prefix:
            values["prefix"] = prefix
    return values


class _PydanticStoreMethods(_StoreCore):
    """The parts of a store that is a pydantic model: validated construction, private state, pickling."""

    def __init__(self, **values: Any):
        try:
            config = config_from_store_fields(values)
        except ConfigError:
            say_config_errors_last()
            raise
        super().__init__(**{field.name: getattr(config, field.name) for field in fields(Config)})
        self._config = config

    @property
    def config(self) -> Config:  # type: ignore[override]  # read-only here: the fields are the config
        return self._config

    def __getstate__(self) -> Dict[str, Any]:
        state = cast(Dict[str, Any], super().__getstate__())
        state["__pydantic_private__"] = {**(state.get("__pydantic_private__") or {}), "_run_logs": None}
        return state

    def _model(self, kind: str, document: Dict[str, Any]) -> Any:
        return self._models[kind].model_validate(document)  # type: ignore[attr-defined]

    def _as_dict(self, log: Any) -> Dict[str, Any]:
        return log.model_dump()


def _pydantic_store_base(base_run_log_store: type, **defaults: Tuple[type, Any]) -> type:
    """The framework's BaseRunLogStore with the config keys as fields (and `defaults` for its own
    fields), and the store's private state."""
    import pydantic

    types = {"str": str, "bool": bool, "int": int, "float": float}
    config_fields: Dict[str, Any] = {
        field.name: (types[str(field.type)], "" if field.name == "s3_bucket" else field.default)
        for field in fields(Config)
    }
    config_fields.update(defaults)

    class RunlogS3StoreBase(base_run_log_store):
        _config: Optional[Config] = pydantic.PrivateAttr(default=None)
        _run_logs: Optional[S3RunLogs] = pydantic.PrivateAttr(default=None)

    return pydantic.create_model("RunlogS3StoreFields", __base__=RunlogS3StoreBase, __module__=__name__,
                                 **config_fields)


# magnus 0.5 #######################################################################################
#
# `run_log_store: {type: s3, config: {...}}` as in 0.4; the store is a pydantic 2 model built with the
# config keys as keyword arguments; the run log's data model is 0.4's.


class _Magnus05StoreMethods(_PydanticStoreMethods, _MagnusStoreMethods):
    """magnus 0.5's store: the magnus interface with pydantic 2 models."""

    _models: ClassVar[Dict[str, Any]] = {}


def _build_magnus05_stores() -> Dict[str, type]:
    """S3RunLogStore and ChunkedS3RunLogStore for magnus 0.5, pydantic models on its BaseRunLogStore."""
    from magnus import datastore, exceptions

    return _store_classes(
        _Magnus05StoreMethods, _pydantic_store_base(datastore.BaseRunLogStore), f"magnus {_installed_version('magnus')}",
        _models={"RunLog": datastore.RunLog, "StepLog": datastore.StepLog, "BranchLog": datastore.BranchLog},
        _errors=_framework_errors(exceptions, MAGNUS_ERRORS),
    )


# runnable #########################################################################################
#
# `run-log-store: {type: s3, config: {...}}` in runnable-config.yaml. Parameters are typed
# ({kind: json|object|metric, value}) and scoped to branches; a job's run holds a job log. The store
# says supports_parallel_writes, so runnable runs parallel and map branches in parallel.


class _RunnableStoreMethods(_PydanticStoreMethods, _MagnusStoreMethods):
    """runnable's store: the magnus interface, plus branch parameters, job logs and a summary."""

    _models: ClassVar[Dict[str, Any]] = {}

    def get_summary(self) -> Dict[str, Any]:
        """What runnable prints at the end of a run: where the run's log is."""
        context = sys.modules["runnable.context"].get_run_context()
        run_id = context.run_id if context is not None else "<run_id>"
        return {"Type": self.service_name, "Location": self.run_logs.where(run_id)}  # type: ignore[attr-defined]

    def get_parameters(self, run_id: str, internal_branch_name: str = "", **kwargs: Any) -> dict:
        """The parameters of the run, or of a branch (runnable scopes them), as runnable's typed models."""
        if internal_branch_name:
            log = self._call(run_id, self.run_logs.read_branch, run_id, internal_branch_name,
                             missing=("BranchLogNotFoundError", internal_branch_name))
        else:
            log = self._call(run_id, self.run_logs.read, run_id, False)
        return self._model("RunLog", {"run_id": run_id, "parameters": log.get("parameters", {})}).parameters

    def set_parameters(self, run_id: str, parameters: dict, internal_branch_name: str = "", **kwargs: Any) -> None:
        """Add or overwrite the parameters of the run, or of a branch."""
        values = {name: value.model_dump() if hasattr(value, "model_dump") else value
                  for name, value in parameters.items()}
        self._call(run_id, self.run_logs.set_branch_parameters, run_id, internal_branch_name, values,
                   missing=("BranchLogNotFoundError", internal_branch_name))

    def get_job_log(self, run_id: str) -> Any:
        """The job log of a job's run (JobLogNotFoundError when the run has none)."""
        job = self._call(run_id, self.run_logs.read, run_id, False).get("job")
        if not job:
            raise self._errors["JobLogNotFoundError"](f"run log {run_id!r} holds no job log", run_id)
        return self._models["JobLog"].model_validate(job)

    def add_job_log(self, run_id: str, job_log: Any) -> None:
        """Set the job log of a job's run, and the run's status to the job's."""
        job = self._as_dict(job_log)
        self._call(run_id, self.run_logs.set_run_fields, run_id, {"job": job, "status": job.get("status", "")})


RUNNABLE_ERRORS = MAGNUS_ERRORS + ("JobLogNotFoundError",)


def _build_runnable_stores() -> Dict[str, type]:
    """S3RunLogStore and ChunkedS3RunLogStore for runnable, pydantic models on its BaseRunLogStore that
    say supports_parallel_writes (so runnable runs branches in parallel)."""
    from runnable import datastore, exceptions

    base = _pydantic_store_base(datastore.BaseRunLogStore, supports_parallel_writes=(bool, True))
    return _store_classes(
        _RunnableStoreMethods, base, f"runnable {_installed_version('runnable')}",
        _models={"RunLog": datastore.RunLog, "StepLog": datastore.StepLog, "BranchLog": datastore.BranchLog,
                 "JobLog": datastore.JobLog},
        _errors=_framework_errors(exceptions, RUNNABLE_ERRORS),
    )


def framework_in_use() -> str:
    """'runnable', 'magnus 0.5', 'magnus 0.4' or '': the framework the store classes are built for. The
    one already imported is the one loading its stores; else the first installed."""
    import importlib

    frameworks = ("runnable", "magnus")
    imported = [name for name in frameworks if sys.modules.get(name) is not None]
    for name in imported + [name for name in frameworks if name not in imported]:
        try:
            datastore = importlib.import_module(f"{name}.datastore")
        except ImportError:
            continue
        if name == "runnable":
            return name
        return "magnus 0.5" if hasattr(datastore.BaseRunLogStore, "model_fields") else "magnus 0.4"
    return ""


if TYPE_CHECKING:
    # What an editor's "go to definition" (and mypy) finds for runlog_s3.S3RunLogStore: the interface
    # every framework's class shares (_MagnusStoreMethods), here as the class without a framework. At
    # run time module __getattr__ builds the class of the framework in use.
    S3RunLogStore = _PlainStoreMethods
    ChunkedS3RunLogStore = _PlainStoreMethods

_STORE_BUILDERS: Dict[str, Callable[[], Dict[str, type]]] = {
    "runnable": _build_runnable_stores, "magnus 0.5": _build_magnus05_stores, "magnus 0.4": _build_magnus04_stores,
    "": _build_plain_stores,
}


# magnus matches an integration to a store by (executor, service type, the store's service_name). The
# stores' service names are their own, so the integrations magnus_extensions declares for its `s3`
# and `chunked-s3` stores (a race-condition warning, a mount) never apply to these, and these never
# collide with its ("Multiple integrations ... found").
SERVICE_NAMES = {"S3RunLogStore": "runlog-s3", "ChunkedS3RunLogStore": "runlog-chunked-s3"}
# The executors of magnus 0.4.16, magnus_extensions 0.2.13 and magnus 0.5.1, as magnus names them.
EXECUTORS = {"local": "Local", "local-container": "LocalContainer", "demo-renderer": "DemoRenderer", "argo": "Argo",
             "k8s-job": "K8sJob", "kfp": "Kfp", "slurm": "Slurm", "slurm-job": "SlurmJob", "mocked": "Mocked"}


def integration_name(executor: str, store: str) -> str:
    """The module attribute (and entry point target) of the integration of `store` with `executor`."""
    return f"{EXECUTORS[executor]}{store}Integration"


def _build_magnus_integrations() -> Dict[str, type]:
    """One integration per executor and store (magnus 0.4 and 0.5; runnable has none). None warns: the
    store takes any number of writers. local-container mounts the credentials file the config reads
    (read-only, where botocore looks inside the container); on magnus 0.4 it also passes through the
    environment variables the config names. (magnus 0.5 records its context's variables in every run
    log's run_config, so there a secret is never put among them: pass them with the executor's
    `environment`, which magnus 0.5 also records, or use a credentials file.)"""
    from pathlib import Path

    from magnus.integration import BaseIntegration

    class RunLogS3Integration(BaseIntegration):
        service_type = "run_log_store"

    class LocalContainerRunLogS3Integration(RunLogS3Integration):
        def configure_for_traversal(self, **kwargs: Any) -> None:
            config: Config = self.service.config
            variables = getattr(self.executor, "variables", None)  # magnus 0.4 only
            if config.use_credentials:
                names = (config.aws_access_key_name, config.aws_secret_access_key_name, config.aws_session_key_name)
                if variables is not None:
                    variables.update({name: os.environ[name] for name in names if name in os.environ})
                return
            credentials = Path(os.path.expanduser(config.aws_credentials_file))
            volumes = getattr(self.executor, "volumes", None)
            if volumes is None:
                volumes = self.executor._volumes  # magnus 0.5
            if credentials.is_file():
                volumes[str(credentials.resolve())] = {"bind": "/root/.aws/credentials", "mode": "ro"}

    classes: Dict[str, type] = {}
    for store, provider in SERVICE_NAMES.items():
        for executor in EXECUTORS:
            base = LocalContainerRunLogS3Integration if executor == "local-container" else RunLogS3Integration
            name = integration_name(executor, store)
            classes[name] = type(name, (base,), {"executor_type": executor, "service_provider": provider,
                                                 "__module__": __name__})
    return classes


_lazy_names: Dict[str, type] = {}


def __getattr__(name: str) -> Any:
    # PEP 562: the store and integration classes are built (importing the framework) the first time
    # someone asks for one.
    if name in SERVICE_NAMES or name.endswith("Integration"):
        if name not in _lazy_names:
            build = _STORE_BUILDERS[framework_in_use()] if name in SERVICE_NAMES else _build_magnus_integrations
            _lazy_names.update(build())
        if name in _lazy_names:
            return _lazy_names[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The names magnus and runnable find the stores by (both read the entry point group run_log_store):
# `type:` in their config, including the dotted class paths.
STORE_NAMES = {"s3": "S3RunLogStore", "runlog-s3": "S3RunLogStore", "runlog_s3.S3RunLogStore": "S3RunLogStore",
               "chunked-s3": "ChunkedS3RunLogStore", "runlog-chunked-s3": "ChunkedS3RunLogStore",
               "runlog_s3.ChunkedS3RunLogStore": "ChunkedS3RunLogStore"}


def entry_points_text() -> str:
    """The entry points this module declares (setup.cfg holds the same; `register` writes them)."""
    lines = ["[console_scripts]", "runlog-s3 = runlog_s3:main", "", "[integration]"]
    lines += [f"{SERVICE_NAMES[store]}-{executor} = runlog_s3:{integration_name(executor, store)}"
              for store in SERVICE_NAMES for executor in EXECUTORS]
    lines += ["", "[run_log_store]"] + [f"{name} = runlog_s3:{store}" for name, store in STORE_NAMES.items()]
    return "\n".join(lines) + "\n"


# Command line #####################################################################################
#
# python -m runlog_s3 {get,ls,show,put,rm,check}: configured by flags, RUNLOG_S3_* variables, or a
# magnus config file. Exit codes: 0 ok, 1 not found, exists or check failed, 2 usage or configuration
# error, 130 interrupted, 141 output cut short.

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 130, 141  # 128 + SIGINT, 128 + SIGPIPE, as shells report them

_CLI_SETTINGS = (
    # (flag, environment variable, config key)
    ("bucket", "RUNLOG_S3_BUCKET", "s3_bucket"),
    ("prefix", "RUNLOG_S3_PREFIX", "prefix"),
    ("region", "RUNLOG_S3_REGION", "region"),
    ("profile", "RUNLOG_S3_PROFILE", "aws_profile"),
    ("endpoint_url", "RUNLOG_S3_ENDPOINT_URL", "endpoint_url"),
)

_LOCAL_BUCKET = "runlog-s3-local"
_LOCAL_KEY_NAMES = ("RUNLOG_S3_LOCAL_ACCESS_KEY_ID", "RUNLOG_S3_LOCAL_SECRET_ACCESS_KEY")


class UsageError(RunlogS3Error):
    """The command line asks for something that cannot be done as asked."""


class LocalS3Server:
    """moto's S3-compatible server (and STS), in this process, on a loopback port (`port` 0: a free one).

    Served single-threaded: moto's threaded server checks If-Match and stores the object in two
    steps, so it can itself lose a race that real S3 does not.
    """

    def __init__(self, threaded: bool = False, port: int = 0):
        import errno
        import socket

        try:
            from moto.server import DomainDispatcherApplication, create_backend_app
            from werkzeug.serving import WSGIRequestHandler, make_server
        except ImportError as exc:
            raise ConfigError(
                "the embedded S3 server needs moto's server: pip install 'moto[server,s3,sts]>=5' flask flask-cors "
                "(or pip install '.[local]' in a checkout of runlog-s3)"
            ) from exc
        connections: set[Any] = set()  # the sockets being served, which stop() cuts

        class RequestHandler(WSGIRequestHandler):
            # A client that connected and went quiet (a process stopped mid-request, Ctrl-C in the
            # middle of a send) holds a single-threaded server: it waits this long at most.
            timeout = 30

            def setup(self) -> None:
                super().setup()
                connections.add(self.connection)

            def finish(self) -> None:
                connections.discard(self.connection)
                super().finish()

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        application = DomainDispatcherApplication(create_backend_app)
        # Bound here, so that a port in use is our one-line error (werkzeug prints and exits).
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("127.0.0.1", port))
            listener.listen(128)
            self._server = make_server("127.0.0.1", listener.getsockname()[1], application, threaded=threaded,
                                       request_handler=RequestHandler, fd=listener.fileno())
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise UsageError(f"port {port} on 127.0.0.1 is in use: pick another with --port, or --port 0 "
                                 "for a free one") from exc
            raise
        finally:
            listener.close()  # the server holds its own copy of the socket
        self._connections = connections
        self.port = int(self._server.server_address[1])
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-s3", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"LocalS3Server({self.endpoint_url!r})"

    def __enter__(self) -> LocalS3Server:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving and close the socket, within seconds even when a client went quiet mid-request
        (a Ctrl-C that cut one of this process's own requests left such a connection)."""
        import socket

        threading.Thread(target=self._server.shutdown, name="local-s3-stop", daemon=True).start()
        deadline = time.monotonic() + 10
        while self._thread.is_alive() and time.monotonic() < deadline:
            for connection in list(self._connections):
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # closed meanwhile
            self._thread.join(0.1)
        self._server.server_close()


def create_bucket(client: S3Client) -> None:
    """CreateBucket for the client's bucket in its region (used against local servers)."""
    body = b""
    if client.config.region != "us-east-1":
        body = (
            '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{client.config.region}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()
    client._request("PUT", "", body=body, operation="CreateBucket")


# Every name a magnus or runnable config may give this module's stores (STORE_NAMES, dotted paths
# included), and the layout each writes.
_STORE_TYPES = {name: "chunked-s3" if store == "ChunkedS3RunLogStore" else "s3" for name, store in STORE_NAMES.items()}


def _load_config_file(path: str) -> Tuple[Dict[str, Any], str]:
    """The store's config block of a magnus config file (run_log_store:) or a runnable one
    (run-log-store:), YAML when PyYAML is there, or JSON, and the layout its store type writes."""
    try:
        with open(path, "rb") as stream:
            text = stream.read().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = json.loads(text)
    except ValueError:
        data = _load_yaml(text, path)
    store = (data.get("run_log_store") or data.get("run-log-store")) if isinstance(data, dict) else None
    if not isinstance(store, dict):
        raise ConfigError(f"config file {path} has no run_log_store block (run-log-store in runnable's)")
    store_type = store.get("type") or "s3"
    if store_type not in _STORE_TYPES:
        raise ConfigError(
            f"config file {path}: run_log_store type {store_type!r} is not one of this module's stores "
            f"({', '.join(_STORE_TYPES)})"
        )
    # runnable also takes the keys beside type, without config:
    config = store["config"] if "config" in store else {key: value for key, value in store.items() if key != "type"}
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path}: run_log_store.config must be a mapping")
    return with_runnable_spelling(config), _STORE_TYPES[store_type]


def _load_yaml(text: str, path: str) -> Any:
    # With PyYAML or ruamel.yaml, whichever is there: magnus 0.4 brings ruamel.yaml, not PyYAML.
    try:
        import yaml

        load, error = yaml.safe_load, yaml.YAMLError
    except ImportError:
        try:
            from ruamel.yaml import YAML
            from ruamel.yaml.error import YAMLError
        except ImportError:
            raise ConfigError(f"config file {path} is not JSON; install PyYAML or ruamel.yaml to read YAML") from None
        load, error = YAML(typ="safe", pure=True).load, YAMLError
    try:
        return load(text)
    except error as exc:
        raise ConfigError(f"config file {path} is neither JSON nor YAML: {str(exc).splitlines()[0]}") from exc


def cli_config(values: Mapping[str, Any]) -> Config:
    """The Config of a command line: its timeouts and attempts fit a person waiting (5 s to connect,
    10 s for a reply, 4 attempts) unless the config block sets them; the library's fit a pipeline."""
    check_config_keys(values)
    if not values.get("s3_bucket"):
        raise ConfigError("no bucket: pass --bucket, set RUNLOG_S3_BUCKET, or --config a magnus config file "
                          "(--bucket s3://bucket/prefix sets both)")
    return Config.from_dict({**_CLI_DEFAULTS, **values})


_CLI_DEFAULTS = {"connect_timeout": 5.0, "read_timeout": 10.0, "max_attempts": 4}


def cli_config_values(args: Any, environ: Mapping[str, str]) -> Dict[str, Any]:
    """The config block the command line stands for: flags, then --config FILE, then RUNLOG_S3_* variables."""
    values: Dict[str, Any] = {}
    for _flag, variable, key in _CLI_SETTINGS:
        if environ.get(variable):
            values[key] = environ[variable]
    if args.config:
        config, layout = _load_config_file(args.config)
        values.update(config)
        args.config_layout = layout
    for flag, _variable, key in _CLI_SETTINGS:
        if getattr(args, flag, None) is not None:
            values[key] = getattr(args, flag)
    bucket = values.get("s3_bucket")
    if isinstance(bucket, str) and bucket.startswith("s3://"):  # s3://bucket/prefix, as aws s3 takes it
        name, _, prefix = bucket[len("s3://"):].partition("/")
        values["s3_bucket"] = name
        if prefix and getattr(args, "prefix", None) is None:
            values["prefix"] = prefix.rstrip("/")
    return values


# Bidirectional overrides and isolates: they reorder what a terminal shows after them.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def printable(text: Any) -> str:
    """`text` safe to print on a terminal: control characters (an escape sequence, a carriage return, a
    newline), line separators and bidirectional overrides written as \\x1b, \\r, \\u202e instead of acted
    on. Step names, map items, messages and statuses come from run logs that anyone may have written."""
    text = str(text)
    if text.isprintable():  # the usual case, in one pass of C
        return text
    return "".join(
        ch.encode("unicode_escape").decode("ascii")
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp") or ch in _BIDI_CONTROLS else ch
        for ch in text
    )


def branch_label(step: Mapping[str, Any], branch: Mapping[str, Any]) -> str:
    """What show and timeline call a branch: its internal name after its step's, so that a map item
    keeps its dots (train.csv and test.csv, not csv twice) and a parallel branch is its own name."""
    name = str(branch.get("internal_name", ""))
    parent = str(step.get("internal_name", ""))
    if parent and name.startswith(parent + "."):
        return name[len(parent) + 1:]
    return name


def _color(text: str, status: str, enabled: bool) -> str:
    if not enabled:
        return text
    code = {"SUCCESS": "32", "FAIL": "31", "PROCESSING": "33", "CREATED": "33"}.get(status, "0")
    return f"\033[{code}m{text}\033[0m"


def _step_summary(step: Mapping[str, Any]) -> str:
    attempts = step.get("attempts") or []
    parts = []
    if attempts:
        parts.append(f"{len(attempts)} attempt{'s' if len(attempts) != 1 else ''}")
        duration = _attempt_duration(attempts[-1]) if isinstance(attempts[-1], dict) else ""
        if duration:
            parts.append(str(duration))
    if step.get("mock"):
        parts.append("mock")
    return "  ".join(parts)


def _attempt_duration(attempt: Mapping[str, Any]) -> str:
    # magnus records an attempt's duration; runnable computes it from start and end (as str(timedelta)).
    if attempt.get("duration"):
        return str(attempt["duration"])
    start, end = _clock_time(attempt.get("start_time")), _clock_time(attempt.get("end_time"))
    if start is None or end is None:
        return ""
    from datetime import timedelta

    return str(timedelta(seconds=round(end - start, 6)))


def use_color(stream: Any) -> bool:
    """Colour on a terminal, unless NO_COLOR is set or TERM is dumb (or unset)."""
    return stream.isatty() and not os.environ.get("NO_COLOR") and (os.environ.get("TERM") or "dumb") != "dumb"


def render_tree(document: Mapping[str, Any], color: bool = False, limit: int = 0, written_by: str = "") -> List[str]:
    """A run log as lines of a tree: steps, branches and nested steps with status, attempts, duration.

    With a limit, each branch shows its first `limit` steps and a count of the rest.
    """
    status = printable(document.get("status", ""))
    lines = [
        f"run {printable(document.get('run_id'))}  {_color(status, status, color)}  "
        f"{_count(len(document.get('parameters') or {}), 'parameter')}"
        + (f"  written by {printable(written_by)}" if written_by else "")
    ]
    job = document.get("job")
    if isinstance(job, dict):  # a runnable job's run: one job log, no steps
        job_status = printable(job.get("status", ""))
        summary = printable(_step_summary(job))
        lines.append(f"job  {_color(job_status, job_status, color)}" + (f"  {summary}" if summary else ""))

    def walk(container: Mapping[str, Any], indent: str) -> None:
        steps = list((container.get("steps") or {}).values())
        shown = steps[:limit] if limit and len(steps) > limit + 1 else steps
        entries: List[Tuple[str, Any]] = [("step", step) for step in shown]
        if len(shown) < len(steps):
            entries.append(("more", len(steps) - len(shown)))
        for index, (kind, item) in enumerate(entries):
            last = index == len(entries) - 1
            elbow, carry = ("└── ", "    ") if last else ("├── ", "│   ")
            if kind == "more":
                lines.append(f"{indent}{elbow}... {item} more steps")
                continue
            step_status = printable(item.get("status", ""))
            summary = printable(_step_summary(item))
            lines.append(
                f"{indent}{elbow}{printable(item.get('name') or item.get('internal_name'))}  "
                f"{_color(step_status, step_status, color)}" + (f"  {summary}" if summary else "")
            )
            branches = list((item.get("branches") or {}).values())
            for b_index, branch in enumerate(branches):
                b_last = b_index == len(branches) - 1
                b_elbow, b_carry = ("└── ", "    ") if b_last else ("├── ", "│   ")
                b_status = printable(branch.get("status", ""))
                name = printable(branch_label(item, branch))
                lines.append(f"{indent}{carry}{b_elbow}[{name}]  {_color(b_status, b_status, color)}")
                walk(branch, indent + carry + b_carry)

    walk(document, "")
    return lines


class BucketRuns:
    """The runs of both layouts under one bucket and prefix: the command line finds a run wherever it is."""

    def __init__(self, client: S3Client):
        self.plain = S3RunLogs(client)
        self.chunked = ChunkedS3RunLogs(client)

    def __repr__(self) -> str:
        return f"BucketRuns(bucket={self.plain.client.bucket!r}, prefix={self.plain.prefix!r})"

    def read(self, run_id: str) -> Dict[str, Any]:
        """The whole run log: one GET for the s3 layout, else one LIST and the GETs of a chunked run."""
        return self.read_with_writer(run_id)[0]

    def read_with_writer(self, run_id: str) -> Tuple[Dict[str, Any], str]:
        """The whole run log and the framework that wrote it (see S3RunLogs.written_by)."""
        removed = None
        for run_logs in (self.plain, self.chunked):
            try:
                document = run_logs.read(run_id)
            except RunLogNotFoundError as exc:
                removed = exc if exc.removed else removed
                continue
            return document, run_logs.written_by(run_id, document)
        raise removed or self._not_found(run_id)

    def read_version(self, run_id: str) -> Tuple[Dict[str, Any], str, S3RunLogs]:
        """(run log, version, layout) of a run: its ETag for the s3 layout (one GET), a digest of its objects'
        ETags for chunked-s3 (chunked_version): what put --if-match and edit check before they write."""
        for run_logs in (self.plain, self.chunked):
            try:
                document, version = run_logs.read_version(run_id)
            except RunLogNotFoundError:
                continue
            return document, version, run_logs
        raise self._not_found(run_id)

    def holding(self, run_id: str) -> S3RunLogs:
        """The layout the run is stored in (a chunked run by any of its objects, so the leftovers of a
        deleted one are found too); RunLogNotFoundError when it is in neither."""
        if self.plain.exists(run_id):
            return self.plain
        if self.chunked.exists(run_id) or self.chunked.has_objects(run_id):
            return self.chunked
        raise self._not_found(run_id)

    def status(self, run_id: str, layout: str) -> Tuple[str, str]:
        """A listed run's status and the framework that wrote it: one GET of its run log (s3) or run
        object (chunked-s3); '?' if unreadable, INCOMPLETE for a chunked folder without its run object,
        REMOVED for rm's marker."""
        state = read_run_state(self.chunked if layout == "chunked-s3" else self.plain, run_id)
        return state.status, state.written_by

    def list(self) -> List[Tuple[ObjectInfo, str]]:
        """(run, layout) for the runs of both layouts, oldest first."""
        entries = self.plain.list_top_level()
        runs = [(run, run_logs.layout) for run_logs in (self.plain, self.chunked) for run in run_logs.runs_in(entries)]
        return sorted(runs, key=lambda item: (item[0].last_modified, item[0].key))

    def runs_elsewhere(self, keys: int = 1000) -> Dict[str, int]:
        """Other prefixes of the bucket with what look like runs (a <run>.json, or a <run>/RunLog.json of
        a chunked run), and how many, from its first `keys` keys: one LIST page, for ls to point at when
        its own prefix holds none."""
        import itertools

        listed = [info.key for info in itertools.islice(self.plain.client.list_objects(""), keys)]
        folders = {key[: -len(CHUNK_RUN_OBJECT)] for key in listed if key.endswith("/" + CHUNK_RUN_OBJECT)}
        found: Dict[str, int] = {}
        for folder in folders:
            prefix = folder.rstrip("/").rpartition("/")[0]
            found[prefix] = found.get(prefix, 0) + 1
        for key in listed:
            if key.endswith(RUN_LOG_SUFFIX) and not any(key.startswith(folder) for folder in folders):
                prefix = key.rpartition("/")[0]
                found[prefix] = found.get(prefix, 0) + 1
        found.pop(self.plain.prefix, None)
        return found

    def _not_found(self, run_id: str) -> RunLogNotFoundError:
        return RunLogNotFoundError(
            f"no run log for run id {run_id!r} at {self.plain.where(run_id)} (layout s3) "
            f"or under {self.chunked.where(run_id)} (layout chunked-s3)"
        )


def _print_json(document: Mapping[str, Any], compact: bool = False) -> None:
    if compact:
        print(json.dumps(document, separators=(",", ":"), ensure_ascii=False))
    else:
        print(json.dumps(document, indent=2, ensure_ascii=False))


def _cmd_get(runs: BucketRuns, args: Any) -> int:
    if args.etag:
        document, etag, _layout = runs.read_version(args.run_id)
        _print_json(document, args.compact)
        print(_bare_etag(etag), file=sys.stderr)  # stdout stays the JSON document; put --if-match takes it as it is
        return EXIT_OK
    _print_json(runs.read(args.run_id), args.compact)
    return EXIT_OK


def _cmd_ls(runs: BucketRuns, args: Any) -> int:
    if args.since or args.status or args.limit:  # one LIST of the prefix, a GET per run shown (find_runs)
        rows = _found_rows(runs, args)
    else:
        listed = runs.list()
        statuses = ChunkedS3RunLogs._in_pool(lambda item: runs.status(item[0].key, item[1]), listed)
        # rm's marker is no run; a folder holding logs beside it holds the leftovers of a deleted run
        rows = [{"run_id": run.key, "status": "INCOMPLETE" if status == REMOVED else status, "layout": layout,
                 "written_by": written_by, "last_modified": run.last_modified, "size": run.size, "objects": run.objects}
                for (run, layout), (status, written_by) in zip(listed, statuses)
                if status != REMOVED or (layout == "chunked-s3" and run.objects > 1)]
    for row in rows:  # one format whatever the server or request gave (LIST: ISO 8601, GET: an HTTP date)
        row["last_modified"] = _when(_listed_time(row["last_modified"])) if row["last_modified"] else ""
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        # New columns go last: scripts that cut the first five keep working.
        table = [("RUN_ID", "STATUS", "LAYOUT", "MODIFIED", "SIZE", "WRITTEN BY")] + [
            (printable(row["run_id"]), printable(row["status"]), row["layout"], printable(row["last_modified"]),
             "-" if row["size"] is None else
             f"{row['size']} bytes" + (f" in {_count(row['objects'], 'object')}" if row["layout"] == "chunked-s3" else ""),
             printable(row["written_by"]))
            for row in rows
        ]
        widths = [max(len(line[column]) for line in table) for column in range(5)]
        color = use_color(sys.stdout)
        for number, line in enumerate(table):
            cells = [cell.ljust(width) for cell, width in zip(line, widths)]
            if number:  # STATUS coloured as show colours it
                cells[1] = _color(cells[1], line[1], color)
            print("  ".join(cells) + "  " + line[5])
    if not rows and not (args.since or args.status):  # none at all under the prefix, not none that matched
        _say_where_runs_are(runs)
    return EXIT_OK


def _say_where_runs_are(runs: BucketRuns) -> None:
    """For ls on a prefix with no runs: the bucket's other prefixes that look like they hold some, on stderr."""
    import shlex

    elsewhere = runs.runs_elsewhere()
    if elsewhere:
        prefix = runs.plain.prefix + "/" if runs.plain.prefix else ""
        shown = ", ".join(f"--prefix {shlex.quote(other)} ({count})" for other, count in sorted(elsewhere.items()))
        sys.stdout.flush()  # after the table, on a terminal as in a pipe
        print(f"runlog-s3: no runs under s3://{runs.plain.client.bucket}/{prefix}; the bucket has what look like runs "
              f"under {printable(shown)}", file=sys.stderr)


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _cmd_show(runs: BucketRuns, args: Any) -> int:
    document, written_by = runs.read_with_writer(args.run_id)
    if args.json:
        print(json.dumps({**tree_rows(document), "written_by": written_by}, indent=2, ensure_ascii=False))
        return EXIT_OK
    color = use_color(sys.stdout)
    print("\n".join(render_tree(document, color=color, written_by=written_by)))
    return EXIT_OK


def tree_rows(document: Mapping[str, Any]) -> Dict[str, Any]:
    """`show --json`: the run's steps and branches, in order, with what the tree shows of each."""

    def step_row(step: Mapping[str, Any]) -> Dict[str, Any]:
        attempts = [attempt for attempt in step.get("attempts") or [] if isinstance(attempt, dict)]
        return {"name": step.get("name"), "internal_name": step.get("internal_name"), "status": step.get("status"),
                "step_type": step.get("step_type"), "attempts": len(step.get("attempts") or []),
                "duration": _attempt_duration(attempts[-1]) if attempts else "",  # the last attempt's, as show prints it
                "branches": [branch_row(branch) for branch in (step.get("branches") or {}).values()]}

    def branch_row(branch: Mapping[str, Any]) -> Dict[str, Any]:
        return {"internal_name": branch.get("internal_name"), "status": branch.get("status"),
                "steps": [step_row(step) for step in (branch.get("steps") or {}).values()]}

    return {"run_id": document.get("run_id"), "status": document.get("status"),
            "steps": [step_row(step) for step in (document.get("steps") or {}).values()]}


class TimelineRow(NamedTuple):
    """One step or branch of a run on the wall clock (seconds since the epoch; None when never run)."""

    depth: int
    kind: str  # "step" or "branch"
    name: str
    status: str
    start: Optional[float]
    end: Optional[float]
    attempts: List[Tuple[float, float, str]]  # (start, end, status) of each attempt
    critical: bool
    details: str = ""  # for the HTML view's hover: message, parameters, catalog items of the last attempt


def _clock_time(text: Any) -> Optional[float]:
    # magnus 0.4 writes str(datetime.now()): "2026-11-25 21:14:30.933456", local time.
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(text)).timestamp() if text else None
    except ValueError:
        return None


def _attempt_spans(step: Mapping[str, Any]) -> List[Tuple[float, float, str]]:
    spans = []
    for attempt in step.get("attempts") or []:
        start, end = _clock_time(attempt.get("start_time")), _clock_time(attempt.get("end_time"))
        if start is not None:
            spans.append((start, end if end is not None else start, str(attempt.get("status", ""))))
    return spans


def _span(log: Mapping[str, Any], kind: str) -> Tuple[Optional[float], Optional[float]]:
    """When a step (its attempts and branches) or a branch (its steps) began and ended."""
    children = (log.get("branches") if kind == "step" else log.get("steps")) or {}
    spans = [_span(child, "branch" if kind == "step" else "step") for child in children.values()]
    if kind == "step":
        spans += [(start, end) for start, end, _status in _attempt_spans(log)]
    starts = [start for start, _end in spans if start is not None]
    ends = [end for _start, end in spans if end is not None]
    return (min(starts) if starts else None), (max(ends) if ends else None)


def _step_details(step: Mapping[str, Any]) -> str:
    attempts = step.get("attempts") or []
    last = attempts[-1] if attempts and isinstance(attempts[-1], dict) else {}
    parts = [f"internal name {step.get('internal_name')}"]
    if last.get("message"):
        parts.append(f"message: {str(last['message'])[:300]}")
    if last.get("parameters"):
        parts.append(f"parameters: {', '.join(sorted(map(str, last['parameters'])))[:300]}")
    catalog = [str(item.get("name")) for item in step.get("data_catalog") or [] if isinstance(item, dict)]
    if catalog:
        parts.append(f"catalog: {', '.join(catalog)[:300]}")
    return "\n".join(printable(part) for part in parts)  # one line each, whatever the message holds


def timeline_rows(document: Mapping[str, Any]) -> List[TimelineRow]:
    """The run's steps and branches in order, nested, each with its span and attempts, and the critical
    path marked: every step of a critical branch (they ran one after another), and in a critical step
    that fans out, the branch that ended last."""
    rows: List[TimelineRow] = []

    def walk(container: Mapping[str, Any], depth: int, critical: bool) -> None:
        for step in (container.get("steps") or {}).values():
            start, end = _span(step, "step")
            rows.append(TimelineRow(depth, "step", printable(step.get("name") or step.get("internal_name")),
                                    printable(step.get("status", "")), start, end, _attempt_spans(step), critical,
                                    _step_details(step)))
            branches = list((step.get("branches") or {}).values())
            spans = [_span(branch, "branch") for branch in branches]
            latest = max(range(len(branches)), key=lambda n: spans[n][1] or float("-inf")) if branches else -1
            for number, branch in enumerate(branches):
                b_start, b_end = spans[number]
                on_path = critical and number == latest
                rows.append(TimelineRow(depth + 1, "branch", printable(branch_label(step, branch)),
                                        printable(branch.get("status", "")), b_start, b_end, [], on_path))
                walk(branch, depth + 2, on_path)

    walk(document, 0, True)
    return rows


def _clock_bounds(rows: List[TimelineRow]) -> Optional[Tuple[float, float]]:
    """The run's first start and last end on the wall clock; None when nothing has a start time."""
    starts = [row.start for row in rows if row.start is not None]
    ends = [row.end for row in rows if row.end is not None]
    return (min(starts), max(ends)) if starts else None


def render_timeline(document: Mapping[str, Any], width: int = 60, color: bool = False) -> List[str]:
    """The run as a Gantt chart of text: one row per step and branch, bars on one wall-clock scale."""
    rows = timeline_rows(document)
    bounds = _clock_bounds(rows)
    status, run_id = printable(document.get("status", "")), printable(document.get("run_id"))
    if bounds is None:
        return [f"run {run_id}  {_color(status, status, color)}  (no attempt has a start time: "
                "nothing to draw)"]
    first, last = bounds
    scale = (last - first) / width or 1.0
    labels = [("*" if row.critical else " ") + "  " * row.depth + (f"[{row.name}]" if row.kind == "branch" else row.name)
              for row in rows]
    label_width = min(40, max(len(label) for label in labels) + 1)  # a branch's brackets counted: [broken.csv] was cut

    def column(moment: float) -> int:
        return min(width - 1, int((moment - first) / scale))

    lines = [f"run {run_id}  {_color(status, status, color)}  {_seconds(last - first)}  "
             f"(* critical path, █ attempt, × failed attempt, ─ span of a fan-out or branch)"]
    for row, label in zip(rows, labels):
        bar = [" "] * width
        if row.start is not None and row.end is not None:
            for position in range(column(row.start), column(row.end) + 1):
                bar[position] = "─"
        for start, end, attempt_status in row.attempts:
            for position in range(column(start), column(end) + 1):
                bar[position] = "█" if attempt_status == "SUCCESS" else "×"
        took = _seconds(row.end - row.start) if row.start is not None and row.end is not None else "not run"
        tries = f", {len(row.attempts)} attempts" if len(row.attempts) > 1 else ""
        lines.append(f"{label[:label_width].ljust(label_width)} |{''.join(bar)}| {took}{tries}  "
                     f"{_color(row.status, row.status, color)}")
    return lines


_TIMELINE_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:16px}.legend{color:#666;margin-bottom:8px}
.row{display:flex;align-items:center;height:20px;border-bottom:1px solid #f0f0f0}
.row:hover{background:#f6f8ff}.label{width:320px;flex:none;box-sizing:border-box;white-space:nowrap;overflow:hidden;
text-overflow:ellipsis}
.track{position:relative;flex:1;height:12px;background:#fafafa}.info{width:220px;flex:none;box-sizing:border-box;
padding-left:8px;color:#555}
.axis{height:24px;border-bottom:1px solid #ccc;position:sticky;top:0;background:#fff}.axis .track{height:24px;
background:none}.tick{position:absolute;top:0;height:24px;border-left:1px solid #bbb;padding-left:3px;font-size:11px;
color:#666;white-space:nowrap}
.bar{position:absolute;top:0;height:12px;min-width:2px}.span{background:#c9d3e6;top:5px;height:2px}
.ok{background:#3a9d5d}.fail{background:#d9534f}.critical .label{font-weight:600}
.SUCCESS .status{color:#2e7d32}.FAIL .status{color:#c62828}.PROCESSING .status,.CREATED .status{color:#b26a00}
details>summary{list-style:none;cursor:pointer}details>summary::-webkit-details-marker{display:none}
details>summary .label::before{content:"\\25BE  "}details:not([open])>summary .label::before{content:"\\25B8  "}
"""


def axis_ticks(total: float, most: int = 10) -> List[float]:
    """Offsets (seconds from the run's start) for a time axis of `total` seconds: 1, 2 or 5 times a power of
    ten apart, at most `most` + 1 of them, 0 first."""
    import math

    if total <= 0:
        return [0.0]
    step = 10 ** math.floor(math.log10(total / most))
    for factor in (1, 2, 5, 10):
        if total / (step * factor) <= most:
            step *= factor
            break
    return [round(number * step, 9) for number in range(int(total / step + 1e-9) + 1)]


def _tick_label(offset: float, step: float) -> str:
    if step >= 60:
        return f"{int(offset // 60)}:{int(offset % 60):02d}"
    decimals = max(0, -int(f"{step:e}".split("e")[1]))
    return f"{offset:.{decimals}f} s"


def render_timeline_html(document: Mapping[str, Any]) -> str:
    """The timeline as one self-contained HTML page: inline CSS, no script, no network; one time axis with
    ticks over every row (each row's track starts at the same x, however deep its label); hover a row for
    its details; branches fold (closed from the start when the run has over 200 rows)."""
    import html

    rows = timeline_rows(document)
    bounds = _clock_bounds(rows)
    first, last = bounds or (0.0, 1.0)
    total = (last - first) or 1.0

    def bar(start: float, end: float, kind: str) -> str:
        return (f'<span class="bar {kind}" style="left:{100 * (start - first) / total:.3f}%;'
                f'width:{100 * (end - start) / total:.3f}%"></span>')

    def when(moment: Optional[float]) -> str:
        from datetime import datetime

        return datetime.fromtimestamp(moment).isoformat(sep=" ", timespec="milliseconds") if moment else "not run"

    status = printable(document.get("status", ""))
    run_id = html.escape(printable(document.get("run_id")))
    fold = "" if len(rows) > 200 else " open"
    out = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>run {run_id}</title>'
           f"<style>{_TIMELINE_CSS}</style></head><body>",
           f'<h1>run {run_id} &middot; {html.escape(status)} &middot; {_seconds(last - first) if bounds else "not run"}</h1>',
           '<div class="legend">* critical path &middot; green: an attempt &middot; red: a failed attempt &middot; '
           "line: the span of a fan-out or branch &middot; hover a row for details, click a branch to fold it</div>"]
    ticks = axis_ticks(last - first) if bounds else [0.0]
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    out.append('<div class="row axis"><span class="label">time since the run began</span><span class="track">'
               + "".join(f'<span class="tick" style="left:{100 * offset / total:.3f}%">{_tick_label(offset, step)}</span>'
                         for offset in ticks) + '</span><span class="info"></span></div>')
    open_depths: List[int] = []
    for row in rows:
        while open_depths and open_depths[-1] >= row.depth:
            out.append("</details>")
            open_depths.pop()
        took = _seconds(row.end - row.start) if row.start is not None and row.end is not None else "not run"
        tries = f", {len(row.attempts)} attempts" if len(row.attempts) > 1 else ""
        hover = (f"{row.name} ({row.kind})\nstart {when(row.start)}\nend {when(row.end)}\nduration {took}\n"
                 f"attempts {len(row.attempts)}, {sum(a[2] != 'SUCCESS' for a in row.attempts)} failed\n"
                 f"status {row.status}" + (f"\n{row.details}" if row.details else ""))
        bars = []
        if row.start is not None and row.end is not None and (row.kind == "branch" or not row.attempts):
            bars.append(bar(row.start, row.end, "span"))
        bars += [bar(start, end, "ok" if attempt_status == "SUCCESS" else "fail") for start, end, attempt_status in row.attempts]
        name = html.escape(f"[{row.name}]" if row.kind == "branch" else row.name)
        line = (f'<div class="row {html.escape(row.status)}{" critical" if row.critical else ""}" '
                f'data-kind="{row.kind}" title="{html.escape(hover)}">'
                f'<span class="label" style="padding-left:{row.depth * 1.2:.1f}em">{"* " if row.critical else ""}{name}</span>'
                f'<span class="track">{"".join(bars)}</span>'
                f'<span class="info">{took}{tries} <span class="status">{html.escape(row.status)}</span></span></div>')
        if row.kind == "branch":
            out.append(f"<details{fold}><summary>{line}</summary>")
            open_depths.append(row.depth)
        else:
            out.append(line)
    out.extend("</details>" for _ in open_depths)
    out.append("</body></html>")
    return "\n".join(out)


def _seconds(duration: float) -> str:
    return f"{duration:.2f} s" if duration < 10 else f"{duration:.1f} s"


def timeline_json(document: Mapping[str, Any]) -> Dict[str, Any]:
    """`timeline --json`: the run's span and, in order, each step's and branch's (UTC, ISO 8601), duration in
    seconds, attempts and whether it is on the critical path."""
    rows = timeline_rows(document)
    bounds = _clock_bounds(rows)

    def moment(seconds: Optional[float]) -> Optional[str]:
        from datetime import datetime, timezone

        return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds") if seconds else None

    def took(start: Optional[float], end: Optional[float]) -> Optional[float]:
        return round(end - start, 6) if start is not None and end is not None else None

    return {"run_id": document.get("run_id"), "status": document.get("status"),
            "start": moment(bounds[0]) if bounds else None, "end": moment(bounds[1]) if bounds else None,
            "duration_seconds": took(*bounds) if bounds else None,
            "rows": [{"name": row.name, "kind": row.kind, "depth": row.depth, "status": row.status,
                      "start": moment(row.start), "end": moment(row.end), "duration_seconds": took(row.start, row.end),
                      "attempts": len(row.attempts), "failed_attempts": sum(a[2] != "SUCCESS" for a in row.attempts),
                      "critical": row.critical} for row in rows]}


def _cmd_timeline(runs: BucketRuns, args: Any) -> int:
    document = runs.read(args.run_id)
    if args.json:
        print(json.dumps(timeline_json(document), indent=2, ensure_ascii=False))
        return EXIT_OK
    if not args.html and not args.open:
        color = use_color(sys.stdout)
        print("\n".join(render_timeline(document, width=args.width, color=color)))
        return EXIT_OK
    if not args.html:  # --open alone: a page of its own in the temporary folder
        import tempfile

        handle, args.html = tempfile.mkstemp(prefix=f"runlog-s3-{args.run_id[:40]}-", suffix=".html")
        os.close(handle)
    page = render_timeline_html(document)
    if args.html == "-":
        sys.stdout.write(page + "\n")
        return EXIT_OK
    try:
        with open(args.html, "w", encoding="utf-8") as stream:
            stream.write(page + "\n")
    except OSError as exc:
        raise UsageError(f"cannot write {args.html}: {exc.strerror}") from exc
    print(f"wrote {args.html} ({len(page.encode('utf-8')) // 1024 + 1} KiB, self-contained: open it in any browser)")
    if args.open:
        import webbrowser

        if not webbrowser.open("file://" + os.path.abspath(args.html)):
            print(f"runlog-s3: no browser found here; open {args.html} yourself", file=sys.stderr)
    return EXIT_OK


def _read_run_log_input(path: str, run_id: str) -> Tuple[Dict[str, Any], str]:
    """The run log in a file ('-' or '' for stdin), checked before anything is written."""
    source = path if path and path != "-" else "stdin"
    if source == "stdin" and sys.stdin.isatty():
        raise UsageError("put reads the run log from a FILE argument or from stdin; stdin is a terminal")
    try:
        if source != "stdin":
            with open(path, "rb") as stream:
                body = stream.read()
        else:
            body = sys.stdin.buffer.read()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    _check_write_size(body, source)
    try:
        try:
            document = check_run_log(json.loads(body), source)
        except (UnicodeDecodeError, ValueError) as exc:
            detail = "it is empty" if not body.strip() else f"{type(exc).__name__}: {exc}"
            raise InvalidRunLogError(f"{source} is not a run log: not valid JSON ({detail})") from exc
        if document["run_id"] != run_id:
            raise UsageError(f"{source} holds run log {document['run_id']!r}, not {run_id!r}; nothing written")
        check_run_log_shape(document, source)
    except InvalidRunLogError as exc:  # what a person gave: nothing of it was written (not "left as is")
        raise InvalidRunLogError(f"{exc.message}; nothing written") from exc
    return document, source


def _cmd_put(runs: BucketRuns, args: Any) -> int:
    document, _source = _read_run_log_input(args.file, args.run_id)
    try:
        run_logs = runs.holding(args.run_id)  # the layout the run is in comes first
        exists = True
    except RunLogNotFoundError:
        run_logs = runs.chunked if (args.layout or args.config_layout or "s3") == "chunked-s3" else runs.plain
        exists = False
    if args.layout and args.layout != run_logs.layout:  # only an explicit --layout can disagree
        raise UsageError(f"run {args.run_id!r} is stored in layout {run_logs.layout}, not {args.layout}; nothing written")
    where = run_logs.where(args.run_id)
    if args.create or not exists:
        run_logs.create(document)  # If-None-Match: a run created meanwhile is refused, not replaced
    elif args.if_match:
        try:
            run_logs.replace_if_unchanged(document, args.if_match)
        except PreconditionFailedError as exc:
            outcome = ("a first attempt's reply was lost, so it may have been written all the same: get it again "
                       "to see" if exc.may_have_landed else "nothing written: get it again (get --etag)")
            error = ConflictError(f"{where} changed since ETag {args.if_match}; {outcome}, apply your change, and put "
                                  "again")
            error.may_have_landed = exc.may_have_landed
            raise error from exc
    elif args.force:
        run_logs.replace(document)
    else:  # the run exists: exit 1, as put --create says it (one situation, one code)
        raise RunLogExistsError(
            f"{where} exists; nothing written: use edit {args.run_id} (compare-and-swap), put --if-match ETAG "
            "(from get --etag), or put --force to replace it whatever it holds"
        )
    print(f"wrote {where} ({len(encode_run_log(document))} bytes)")
    return EXIT_OK


def _cmd_edit(runs: BucketRuns, args: Any) -> int:
    """get, $EDITOR, then put with If-Match on the ETag read: like kubectl edit, nothing is lost on conflict."""
    import shlex
    import subprocess
    import tempfile

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or ""
    if not editor and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise UsageError("edit needs an editor: set VISUAL or EDITOR (vi, its fallback, needs a terminal and there "
                         "is none here); nothing read or written")
    editor = editor or "vi"
    document, etag, run_logs = runs.read_version(args.run_id)
    where = run_logs.where(args.run_id)
    original = json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    handle, path = tempfile.mkstemp(prefix=f"runlog-{args.run_id[:40]}-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(original)
    kept = f"your edit is kept in {path}"
    try:
        status = subprocess.call(shlex.split(editor) + [path])
    except OSError as exc:
        os.unlink(path)
        raise UsageError(f"cannot start the editor {editor!r} ({exc.strerror}); set VISUAL or EDITOR") from exc
    with open(path, encoding="utf-8") as stream:
        edited = stream.read()
    if status != 0:
        if edited == original:  # nothing to keep
            os.unlink(path)
            raise UsageError(f"the editor {editor!r} exited with {status} and changed nothing; nothing written")
        raise UsageError(f"the editor {editor!r} exited with {status}; nothing written; {kept}")
    if edited == original:
        os.unlink(path)
        print(f"no change; nothing written to {where}", file=sys.stderr)
        return EXIT_OK
    try:
        new = check_run_log(json.loads(edited), path)
        check_run_log_shape(new, path)
    except ValueError as exc:
        raise UsageError(f"{path} is not valid JSON ({exc}); nothing written; {kept}") from exc
    except InvalidRunLogError as exc:
        raise UsageError(f"{exc.message}; nothing written; {kept}") from exc
    if new["run_id"] != args.run_id:
        raise UsageError(f"the edit changed run_id to {new['run_id']!r}; nothing written; {kept}")
    try:
        run_logs.replace_if_unchanged(new, etag)
    except PreconditionFailedError as exc:
        outcome = ("a first attempt's reply was lost, so it may have been written all the same" if exc.may_have_landed
                   else "nothing written")
        error = ConflictError(f"{where} changed while you edited it; {outcome}; {kept}: run edit again and re-apply it")
        error.may_have_landed = exc.may_have_landed
        raise error from exc
    os.unlink(path)
    print(f"wrote {where} ({len(encode_run_log(new))} bytes)")
    return EXIT_OK


FINISHED_STATUSES = ("SUCCESS", "FAIL")


def _cmd_rm(runs: BucketRuns, args: Any) -> int:
    if not args.yes and not sys.stdin.isatty():
        raise UsageError(f"refusing to delete run {args.run_id!r} without --yes (stdin is not a terminal)")
    run_logs = runs.holding(args.run_id)
    where = run_logs.where(args.run_id)
    try:
        document, etag = run_logs.read_run_object(args.run_id)
        status = str(document.get("status", "?"))
    except RunLogNotFoundError:  # a chunked folder without its run object: leftovers
        status, etag = "INCOMPLETE", ""
    except InvalidRunLogError:
        status, etag = "?", ""
    if status not in FINISHED_STATUSES + ("?", "INCOMPLETE") and not args.force:
        # A pipeline still writing it would write on after the delete: what it adds then is found by
        # ls and removed by another rm, but the run it believes in is gone.
        raise UsageError(f"run {args.run_id!r} is {status}: a pipeline may still be writing it; nothing deleted; "
                         "wait until it ends, or rm --force to delete it anyway")
    if not args.yes:
        answer = input(f"delete {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return EXIT_FAILED
    try:  # only the run as it was checked: a pipeline that wrote it since (a retry, a resume) keeps it
        deleted = run_logs.delete(args.run_id, if_match="" if args.force else etag)
    except PreconditionFailedError as exc:
        raise ConflictError(f"{where} was written since it was checked (a pipeline resumed?); nothing deleted; look "
                            "at it again (show), then rm again") from exc
    print(f"deleted {where}" + (f" ({deleted} objects)" if run_logs.layout == "chunked-s3" else ""))
    return EXIT_OK


# The life of runs: find them, keep them, move them ###############################################
#
# ls --since/--status/--limit and prune work on thousands of runs, so they find them with one LIST of the
# prefix. Delimited by "/", a chunked run is a folder whose time costs a LIST of its own. Delimited by
# "Log-" instead, the listing shows every s3 run object and every RunLog.json with its LastModified, and
# rolls a chunked run's StepLog-/BranchLog- objects into at most two common prefixes: both layouts' times
# from the listing itself, no request per run. A run id holding "Log-" rolls up too: that part of the
# prefix is listed again by "/", and each chunked run found there costs one request (its RunLog.json).

LISTING_DELIMITER = "Log-"
LISTABLE_STATUSES = MAGNUS_STATUSES + ("INCOMPLETE",)
REMOVED = "REMOVED"  # what read_run_state says of rm's marker: never listed as a run
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ListedRun(NamedTuple):
    """A run as a listing shows it. Its time is its run object's: the run log (s3) or RunLog.json, which
    every status change rewrites (chunked-s3); for leftovers, their newest object."""

    run_id: str
    layout: str
    last_modified: str  # as S3 gives it
    modified: float  # seconds since the epoch (0 when the server gave none this module reads)
    size: Optional[int] = None  # None: not counted (a chunked run's objects cost a LIST of their own)
    objects: Optional[int] = None
    etag: str = ""
    object_size: int = -1  # the run object's size as listed (rm's marker has MARKER_SIZE); -1: not listed


class RunListing(NamedTuple):
    """What one listing of the prefix shows (list_runs)."""

    runs: List[ListedRun]  # with their times
    unlisted: List[str]  # chunked runs whose RunLog.json the listing could not show (ids holding "Log-")
    leftovers: List[str]  # chunked folders with logs but no RunLog.json (a deleted run's, INCOMPLETE)
    now: Optional[float]  # the server's clock when it answered (None: its replies had no usable Date)
    with_logs: FrozenSet[str] = frozenset()  # chunked folders holding logs (beside rm's marker: leftovers)


class RunState(NamedTuple):
    """A run object as read by one GET: what ls shows and what prune checks before a conditional delete."""

    # INCOMPLETE when the run object is gone (deleted since it was listed), REMOVED for rm's marker, '?' when
    # unreadable
    status: str
    written_by: str
    etag: str = ""
    modified: float = 0.0
    last_modified: str = ""


def parse_duration(text: str, flag: str, zero: str) -> float:
    """Seconds in '90d', '12h', '30m', '45s' or '2w'; UsageError naming the flag otherwise, and for a zero one
    (`zero` says what it would mean)."""
    number, unit = text.strip()[:-1], text.strip()[-1:]
    if unit not in _DURATION_UNITS or not number.replace(".", "", 1).isdigit():
        raise UsageError(f"{flag} {text!r} is not a duration: give a number and a unit, e.g. 90d, 12h, 30m "
                         "(s, m, h, d, w); nothing done")
    seconds = float(number) * _DURATION_UNITS[unit]
    if not seconds:
        raise UsageError(f"{flag} {text!r} is zero: {zero}; nothing done")
    return seconds


def parse_statuses(text: str, flag: str, allowed: Tuple[str, ...], why: str = "") -> Tuple[str, ...]:
    """The statuses of a comma-separated list (any case); UsageError naming the first not in `allowed`."""
    names = tuple(dict.fromkeys(name.strip().upper() for name in text.split(",") if name.strip()))
    wrong = [name for name in names if name not in allowed] or ([] if names else [text])
    if wrong:
        raise UsageError(f"{flag} {text!r}: {wrong[0]!r} is not a status {why or 'of a run'}: give some of "
                         f"{', '.join(allowed)}, comma-separated; nothing done")
    return names


def _listed_time(text: str) -> float:
    # LastModified as a LIST gives it (ISO 8601) or as a GET does (an HTTP date).
    if not text:
        return 0.0
    if text[:1].isdigit():
        try:
            return _parse_iso_time(text)
        except ValueError:
            return 0.0
    return parse_http_date(text) or 0.0


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def list_runs(runs: BucketRuns) -> RunListing:
    """Every run under the prefix with its time, from the pages of one LIST delimited by "Log-" (see above)."""
    client = runs.plain.client
    prefix = f"{runs.plain.prefix}/" if runs.plain.prefix else ""
    found: Dict[Tuple[str, str], ListedRun] = {}
    with_logs, rolled, unlisted = set(), [], []

    def add(info: ObjectInfo) -> None:
        name = info.key[len(prefix):]
        folder, slash, rest = name.partition("/")
        if not slash and name.endswith(RUN_LOG_SUFFIX) and name != RUN_LOG_SUFFIX:
            run_id, layout = name[: -len(RUN_LOG_SUFFIX)], "s3"
        elif slash and rest == CHUNK_RUN_OBJECT and folder:
            run_id, layout = folder, "chunked-s3"
        else:
            return
        size = info.size if layout == "s3" else None
        found[run_id, layout] = ListedRun(run_id, layout, info.last_modified, _listed_time(info.last_modified), size,
                                          1 if layout == "s3" else None, info.etag, info.size)

    for info in client.list_objects(prefix, delimiter=LISTING_DELIMITER):
        if info.etag or info.last_modified:
            add(info)
            continue
        folder, slash, rest = info.key[len(prefix):].partition("/")  # a common prefix
        if slash and rest in _CHUNK_KINDS:
            with_logs.add(folder)
        elif not slash:
            rolled.append(info.key)  # a run id holding "Log-"
    for rolled_prefix in rolled:
        for info in client.list_objects(rolled_prefix, delimiter="/"):
            if info.etag or info.last_modified:
                add(info)
            elif info.key.endswith("/"):
                unlisted.append(info.key[len(prefix):-1])
    chunked = {run_id for run_id, layout in found if layout == "chunked-s3"}
    return RunListing(list(found.values()), sorted(set(unlisted) - chunked), sorted(with_logs - chunked),
                      client.server_now(), frozenset(with_logs))


def read_run_state(run_logs: S3RunLogs, run_id: str) -> RunState:
    """One GET of a run's object: its status, who wrote it, its ETag and time."""
    key = run_logs.key(run_id)
    try:
        stored = run_logs.client.get_object(key)
    except NotFoundError as exc:
        if isinstance(exc, NoSuchBucketError):
            raise
        return RunState("INCOMPLETE" if run_logs.layout == "chunked-s3" else "?", "?")
    try:
        found = decode_run_object(stored.body, f"s3://{run_logs.client.bucket}/{key}")
    except InvalidRunLogError:
        return RunState("?", "?", stored.etag, _listed_time(stored.last_modified), stored.last_modified)
    if found is None:
        return RunState(REMOVED, "?", stored.etag, _listed_time(stored.last_modified), stored.last_modified)
    if landed_late(found, stored.last_modified):  # a void commit: the run as it was
        found = _was(found)
    document = public(found)
    written_by = stored.metadata.get(WRITTEN_BY, "") or guess_framework(document)
    return RunState(str(document.get("status", "?")), written_by, stored.etag, _listed_time(stored.last_modified),
                    stored.last_modified)


def _leftovers_summary(runs: BucketRuns, run_id: str) -> ListedRun:
    # A folder without its run object: one LIST, for its time, size and object count.
    objects = list(runs.chunked.client.list_objects(runs.chunked.folder(run_id)))
    newest = max((info.last_modified for info in objects), key=_listed_time, default="")
    return ListedRun(run_id, "chunked-s3", newest, _listed_time(newest), sum(info.size for info in objects),
                     len(objects))


def find_runs(runs: BucketRuns, since: Optional[float] = None, statuses: Optional[Tuple[str, ...]] = None,
              limit: int = 0) -> List[Tuple[ListedRun, RunState]]:
    """The runs written within `since` seconds with one of `statuses`, newest first, at most `limit`.

    Requests: the listing's pages; then one GET per run inside the window, newest first, in batches no
    larger than the runs still wanted (so none is read past the limit-th match); none for a run outside
    it. Runs the listing cannot time cost one request each first: ids holding "Log-" (a GET of their
    RunLog.json) and, unless --status leaves INCOMPLETE out, leftovers (a LIST of their folder)."""
    listing = list_runs(runs)
    cutoff = (listing.now or wall_clock()) - since if since is not None else None
    known: Dict[Tuple[str, str], RunState] = {}
    candidates = list(listing.runs)

    def timed(run_id: str) -> Tuple[ListedRun, RunState]:
        state = read_run_state(runs.chunked, run_id)
        return ListedRun(run_id, "chunked-s3", state.last_modified, state.modified, etag=state.etag), state

    for run, state in ChunkedS3RunLogs._in_pool(timed, listing.unlisted):
        if state.status == "INCOMPLETE" or (state.status == REMOVED and run.run_id in listing.with_logs):
            listing.leftovers.append(run.run_id)  # no run object after all (or rm's marker): leftovers
        elif state.status == REMOVED:
            continue
        else:
            candidates.append(run)
            known[run.run_id, run.layout] = state
    if statuses is None or "INCOMPLETE" in statuses:
        for run in ChunkedS3RunLogs._in_pool(lambda run_id: _leftovers_summary(runs, run_id), listing.leftovers):
            candidates.append(run)
            known[run.run_id, run.layout] = RunState("INCOMPLETE", "?")
    candidates = sorted((run for run in candidates if cutoff is None or run.modified >= cutoff),
                        key=lambda run: (run.modified, run.run_id), reverse=True)

    def state_of(run: ListedRun) -> RunState:
        held = known.get((run.run_id, run.layout))
        state = held if held is not None else read_run_state(
            runs.chunked if run.layout == "chunked-s3" else runs.plain, run.run_id)
        if state.status == REMOVED and run.layout == "chunked-s3" and run.run_id in listing.with_logs:
            return state._replace(status="INCOMPLETE")  # rm's marker with logs beside it: their leftovers
        return state

    chosen: List[Tuple[ListedRun, RunState]] = []
    position = 0
    while position < len(candidates) and not (limit and len(chosen) >= limit):
        batch = candidates[position:position + (min(ASSEMBLY_THREADS, limit - len(chosen)) if limit else len(candidates))]
        position += len(batch)
        for run, state in zip(batch, ChunkedS3RunLogs._in_pool(state_of, batch)):
            if (state.status != REMOVED and (statuses is None or state.status in statuses)
                    and not (limit and len(chosen) >= limit)):
                chosen.append((run, state))
    return chosen


def _found_rows(runs: BucketRuns, args: Any) -> List[Dict[str, Any]]:
    """ls --since/--status/--limit: the rows of find_runs, oldest first."""
    since = parse_duration(args.since, "--since", "no run was written in no time; give a window, e.g. 1h") if (
        args.since) else None
    statuses = parse_statuses(args.status, "--status", LISTABLE_STATUSES) if args.status else None
    found = find_runs(runs, since, statuses, args.limit)
    return [{"run_id": run.run_id, "status": state.status, "layout": run.layout, "written_by": state.written_by,
             "last_modified": run.last_modified, "size": run.size, "objects": run.objects}
            for run, state in sorted(found, key=lambda item: (item[0].modified, item[0].run_id))]


# prune ############################################################################################


class PruneDecision(NamedTuple):
    run: ListedRun
    delete: bool
    reason: str  # why kept: one of _KEPT_REASONS
    state: Optional[RunState] = None
    objects: int = 1
    newest: float = 0.0  # the run's last write (a chunked run: its newest object)


_KEPT_REASONS = {
    "newer": "written since the cutoff",
    "status": "with a status not in --status",
    "running": "still CREATED or PROCESSING (a pipeline may be writing it)",
    "changed": "written since they were checked",
    "leftovers": "leftovers of a deleted run (INCOMPLETE; rm RUN_ID removes them)",
    "unreadable": "unreadable (not a run log)",
    "gone": "deleted meanwhile",
}


def _decide_prune(runs: BucketRuns, run: ListedRun, cutoff: float, statuses: Tuple[str, ...], now: float
                  ) -> PruneDecision:
    # A run is deleted only if its last write is older than the cutoff and its status is one of `statuses`,
    # both read from the version the delete is then conditioned on (If-Match its ETag). A run object of the
    # size of rm's marker is read first: a marker is no run, young or old.
    if run.modified >= cutoff and run.object_size != MARKER_SIZE:
        return PruneDecision(run, False, "newer")
    objects, newest = 1, run.modified
    if run.layout == "chunked-s3":
        listed = list(runs.chunked.client.list_objects(runs.chunked.folder(run.run_id)))
        if not any(info.key == runs.chunked.key(run.run_id) for info in listed):
            return PruneDecision(run, False, "leftovers" if listed else "gone")
        objects, newest = len(listed), max(_listed_time(info.last_modified) for info in listed)
        if newest >= cutoff and run.object_size != MARKER_SIZE:
            return PruneDecision(run, False, "newer", objects=objects, newest=newest)
    state = read_run_state(runs.chunked if run.layout == "chunked-s3" else runs.plain, run.run_id)
    newest = max(newest, state.modified)
    if state.status == REMOVED:  # rm's marker: deleted once old enough that no request of its run can land
        if objects > 1:
            return PruneDecision(run, False, "leftovers", state, objects, newest)
        old = newest < min(cutoff, now - MARKER_KEPT_SECONDS)
        return PruneDecision(run, old, "" if old else "newer", state, objects, newest)
    if state.status in ("INCOMPLETE", "?") and not state.etag:
        return PruneDecision(run, False, "gone", state)
    if state.status == "?":
        return PruneDecision(run, False, "unreadable", state)
    if state.modified >= cutoff:
        return PruneDecision(run, False, "changed", state, objects, newest)
    if state.status in ("CREATED", "PROCESSING"):
        return PruneDecision(run, False, "running", state, objects, newest)
    if state.status not in statuses:
        return PruneDecision(run, False, "status", state, objects, newest)
    return PruneDecision(run, True, "", state, objects, newest)


def _prune_line(verb: str, runs: BucketRuns, decision: PruneDecision, objects: int) -> str:
    run_logs = runs.chunked if decision.run.layout == "chunked-s3" else runs.plain
    status = decision.state.status if decision.state else "?"
    count = f", {_count(objects, 'object')}" if decision.run.layout == "chunked-s3" else ""
    return f"{verb} {run_logs.where(decision.run.run_id)} ({status}, last written {_when(decision.newest)}{count})"


def _cmd_prune(runs: BucketRuns, args: Any) -> int:
    older_than = parse_duration(args.older_than, "--older-than", "that is every finished run, one that ended a moment "
                                "ago too; give an age, e.g. 30d (1s for every run finished by now)")
    statuses = parse_statuses(args.status, "--status", FINISHED_STATUSES,
                              why="prune deletes (it never deletes a run that may still be written; rm --force does)")
    if not args.dry_run and not args.yes and not sys.stdin.isatty():
        raise UsageError("refusing to prune without --yes (stdin is not a terminal); --dry-run says what it would delete")
    listing = list_runs(runs)
    if listing.now is None:
        # A run's age is judged on the server's clock, which wrote its times: this machine's may be far off.
        raise S3Error(f"prune judges a run's age by the server's clock, and the replies of "
                      f"{runs.plain.client.endpoint_url or 'S3'} carry no usable Date header (or one more than "
                      f"{MAX_CLOCK_CORRECTION / 3600:.0f} h from this machine's clock): nothing deleted; set the clock "
                      "right (NTP), or check any proxy in between", operation="LIST", code="NoServerClock")
    now = listing.now
    cutoff = now - older_than
    timed = listing.runs + [ListedRun(run_id, "chunked-s3", "", 0.0) for run_id in listing.unlisted]
    decisions = ChunkedS3RunLogs._in_pool(lambda run: _decide_prune(runs, run, cutoff, statuses, now), timed)
    decisions += [PruneDecision(ListedRun(run_id, "chunked-s3", "", 0.0), False, "leftovers")
                  for run_id in listing.leftovers]
    decisions.sort(key=lambda decision: (decision.newest or decision.run.modified, decision.run.run_id))
    # rm's markers are no runs: old ones go quietly, counted apart; young ones are left alone
    markers = [decision for decision in decisions if decision.state is not None and decision.state.status == REMOVED
               and decision.reason != "leftovers"]
    decisions = [decision for decision in decisions if decision not in markers]
    markers = [decision for decision in markers if decision.delete]
    doomed = [decision for decision in decisions if decision.delete]
    kept = [decision for decision in decisions if not decision.delete]
    if doomed and not args.dry_run and not args.yes:
        for decision in doomed:
            print(_prune_line("would delete", runs, decision, decision.objects))
        if input(f"delete these {_count(len(doomed), 'run')}? [y/N] ").strip().lower() not in ("y", "yes"):
            print("nothing deleted", file=sys.stderr)
            return EXIT_FAILED

    def delete(decision: PruneDecision) -> Tuple[PruneDecision, int, str]:
        run_logs = runs.chunked if decision.run.layout == "chunked-s3" else runs.plain
        assert decision.state is not None
        try:  # only the version checked: a pipeline that wrote it since (a retry, a resume) keeps it
            if decision.state.status == REMOVED:
                run_logs.delete_marker(decision.run.run_id, decision.state.etag)
                return decision, 1, ""
            # A run last written long enough ago that no request of it can land needs no marker left behind.
            return decision, run_logs.delete(decision.run.run_id, if_match=decision.state.etag,
                                             marker=decision.newest >= now - MARKER_KEPT_SECONDS), ""
        except PreconditionFailedError:
            return decision._replace(delete=False, reason="changed"), 0, ""
        except RunLogNotFoundError:
            return decision._replace(delete=False, reason="gone"), 0, ""
        except RunlogS3Error as exc:
            return decision._replace(delete=False, reason="error"), 0, exc.message

    done = doomed + markers if args.dry_run else ChunkedS3RunLogs._in_pool(delete, doomed + markers)
    deleted = objects = removed = 0
    errors = []
    for result in done:
        decision, count, error = result if not args.dry_run else (result, result.objects, "")
        if error:
            errors.append(error)
            print(f"runlog-s3: error: {error}", file=sys.stderr)
        elif decision.state is not None and decision.state.status == REMOVED:  # one of rm's markers
            removed += decision.delete
        elif decision.delete:
            deleted, objects = deleted + 1, objects + count
            print(_prune_line("would delete" if args.dry_run else "deleted", runs, decision, count))
        else:
            kept.append(decision)
    for decision in kept:  # the runs old enough that were kept for a reason worth a look
        if decision.reason in ("running", "changed", "leftovers", "unreadable"):
            where = (runs.chunked if decision.run.layout == "chunked-s3" else runs.plain).where(decision.run.run_id)
            print(f"kept {where}: {_KEPT_REASONS[decision.reason]}")
    reasons = {reason: sum(decision.reason == reason for decision in kept) for reason in _KEPT_REASONS}
    why = ", ".join(f"{number} {_KEPT_REASONS[reason]}" for reason, number in reasons.items() if number)
    verb = "would prune" if args.dry_run else "pruned"
    print(f"{verb} {_count(deleted, 'run')} ({_count(objects, 'object')}) last written before {_when(cutoff)} "
          f"(older than {args.older_than}) with status {','.join(statuses)}; kept {len(kept)}" + (f": {why}" if why else "")
          + (f"; {'would remove' if args.dry_run else 'removed'} {_count(removed, 'marker')} rm left of deleted runs"
             if removed else "") + ("; nothing deleted (--dry-run)" if args.dry_run else ""))
    return EXIT_FAILED if errors else EXIT_OK


# export and import ################################################################################

EXPORT_FORMAT = "runlog-s3-export"
EXPORT_VERSION = 1


def export_runs(runs: BucketRuns, run_ids: List[str]) -> Dict[str, Any]:
    """The archive of the runs: each run log whole, with its layout and written-by tag as stored."""

    def entry(run_id: str) -> Dict[str, Any]:
        document, _version, run_logs = runs.read_version(run_id)
        return {"run_id": run_id, "layout": run_logs.layout, "written_by": run_logs.writer_tag(run_id),
                "run_log": document}

    prefix = runs.plain.prefix
    return {"format": EXPORT_FORMAT, "version": EXPORT_VERSION, "exported_by": f"runlog-s3 {__version__}",
            "exported_at": _when(wall_clock()), "source": f"s3://{runs.plain.client.bucket}/{prefix + '/' if prefix else ''}",
            "runs": ChunkedS3RunLogs._in_pool(entry, list(dict.fromkeys(run_ids)))}


def _cmd_export(runs: BucketRuns, args: Any) -> int:
    archive = export_runs(runs, args.run_ids)  # every run read before anything is written
    body = (json.dumps(archive, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    said = f"exported {_count(len(archive['runs']), 'run')} ({len(body)} bytes) from {archive['source']}"
    if args.output in ("", "-"):
        sys.stdout.buffer.write(body)
        sys.stdout.flush()
        print(f"{said} to stdout", file=sys.stderr)
        return EXIT_OK
    partial = f"{args.output}.partial-{os.getpid()}"
    try:  # a file that exists is whole: written aside, then renamed
        with open(partial, "wb") as stream:
            stream.write(body)
        os.replace(partial, args.output)
    except OSError as exc:
        if os.path.exists(partial):
            os.unlink(partial)
        raise UsageError(f"cannot write {args.output}: {exc.strerror}; nothing exported") from exc
    print(f"{said} to {args.output}")
    return EXIT_OK


def read_export(body: bytes, source: str) -> List[Dict[str, Any]]:
    """The runs of an archive, every one checked (format, version, shape, run ids) before any is written."""
    def bad(problem: str) -> UsageError:
        return UsageError(f"{source} {problem}; nothing written")

    try:
        archive = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        detail = "it is empty" if not body.strip() else f"{type(exc).__name__}: {_first_line(exc)}"
        raise bad(f"is not a runlog-s3 export: not valid JSON, truncated or another format ({detail})") from None
    if not isinstance(archive, dict) or archive.get("format") != EXPORT_FORMAT:
        hint = " (it looks like one run log: put RUN_ID FILE writes it)" if isinstance(archive, dict) and "run_id" in archive else ""
        raise bad(f"is not a runlog-s3 export: no \"format\": \"{EXPORT_FORMAT}\"{hint}")
    if archive.get("version") != EXPORT_VERSION:
        raise bad(f"is a runlog-s3 export of version {archive.get('version')!r}; this runlog-s3 ({__version__}) reads "
                  f"version {EXPORT_VERSION}: use the runlog-s3 that wrote it")
    entries = archive.get("runs")
    if not isinstance(entries, list):
        raise bad("is not a whole runlog-s3 export: it has no list of runs")
    seen = set()
    for number, entry in enumerate(entries, 1):
        where = f"{source}, run {number}"
        if not isinstance(entry, dict) or not all(isinstance(entry.get(name), kind) for name, kind in (
                ("run_id", str), ("layout", str), ("written_by", str), ("run_log", dict))):
            raise bad(f"has a run ({number}) without run_id, layout, written_by and run_log")
        try:
            validate_run_id(entry["run_id"])
            check_input(entry["run_log"], where)
            check_run_log_shape(entry["run_log"], where)
        except (InvalidRunIdError, InvalidRunLogError) as exc:
            raise UsageError(exc.message if exc.message.endswith("nothing written") else f"{exc.message}; nothing written") from None
        if entry["run_log"]["run_id"] != entry["run_id"]:
            raise bad(f"holds run log {entry['run_log']['run_id']!r} as run {entry['run_id']!r}")
        if entry["layout"] not in LAYOUTS:
            raise bad(f"has run {entry['run_id']!r} in layout {entry['layout']!r}, not one of {', '.join(LAYOUTS)}")
        if not entry["written_by"].isascii() or _has_control_characters(entry["written_by"]):
            raise bad(f"has run {entry['run_id']!r} written by {entry['written_by']!r}: a tag is printable ASCII")
        if entry["run_id"] in seen:
            raise bad(f"holds run {entry['run_id']!r} twice")
        seen.add(entry["run_id"])
    return entries


def _read_import_file(path: str) -> Tuple[bytes, str]:
    if path == "-":
        if sys.stdin.isatty():
            raise UsageError("import reads an export from FILE or from stdin ('-'); stdin is a terminal")
        return sys.stdin.buffer.read(), "stdin"
    try:
        with open(path, "rb") as stream:
            return stream.read(), path
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}; nothing written") from exc


def import_run(runs: BucketRuns, entry: Mapping[str, Any], target: S3RunLogs, force: bool,
               layout_given: bool) -> Tuple[str, S3RunLogs]:
    """Write one run of an archive: created in `target` with If-None-Match; with `force`, a run that exists
    is replaced where it is stored, through replace (the protected path). Returns (verb, layout written)."""
    run_id = entry["run_id"]
    stored = runs.plain if runs.plain.exists(run_id) else runs.chunked if runs.chunked.exists(run_id) else None
    exists = RunLogExistsError(f"not imported {run_id}: it exists at {(stored or target).where(run_id)} (import "
                               "--force replaces it)")
    if stored is None:
        try:
            target.create(entry["run_log"])  # If-None-Match: never over a run created meanwhile
        except RunLogExistsError:
            raise exists from None
        return "imported", target
    if not force:
        raise exists
    if layout_given and stored.layout != target.layout:
        raise UsageError(f"run {run_id!r} is stored in layout {stored.layout}, not {target.layout}; not replaced (rm "
                         "it first, or import without --layout)")
    replacing = LAYOUTS[stored.layout](runs.plain.client)
    replacing.replace(entry["run_log"])  # atomic on chunked-s3, as put --force; the stored tag is kept
    return "replaced", replacing


def _cmd_import(runs: BucketRuns, args: Any) -> int:
    body, source = _read_import_file(args.file)
    entries = read_export(body, source)
    targets = []
    for entry in entries:  # keys and sizes checked in the layout each run goes to, before any write
        target = LAYOUTS[args.layout or args.config_layout or entry["layout"]](runs.plain.client)
        target.writer = entry["written_by"]  # the tag the export recorded, on each run created
        try:
            target.check_writable(entry["run_log"])
        except (InvalidRunIdError, InvalidRunLogError) as exc:
            raise UsageError(f"{source}: {exc.message}") from exc
        targets.append(target)
    imported, existing = 0, 0
    for entry, target in zip(entries, targets):
        try:
            verb, written = import_run(runs, entry, target, args.force, bool(args.layout))
        except RunLogExistsError as exc:
            existing += 1
            print(exc.message)
            continue
        except RunlogS3Error as exc:
            done = f"{imported} of {len(entries)} runs imported before it" if imported else "no run imported"
            exc.message = f"importing {entry['run_id']}: {exc.message} ({done})"
            exc.args = (exc.message,)
            raise
        imported += 1
        tag = f", written by {entry['written_by']}" if entry["written_by"] else ""
        print(f"{verb} {entry['run_id']}: {written.where(entry['run_id'])} (layout {written.layout}{tag})")
    prefix = runs.plain.prefix
    print(f"imported {imported} of {_count(len(entries), 'run')} from {source} into "
          f"s3://{runs.plain.client.bucket}/{prefix + '/' if prefix else ''}"
          + (f"; {existing} exist already (import --force replaces them)" if existing else ""))
    return EXIT_FAILED if existing else EXIT_OK


# check: credentials, the bucket, permissions and conditional writes ###############################
#
# Each check is one line, PASS, FAIL, SKIP or WARN, and names what to do; the race proves that the server
# applies conditional writes atomically, which the guarantee needs.

class CheckResult(NamedTuple):
    """One line of `check`: result PASS, FAIL, SKIP (a check that could not be made here) or WARN;
    counts, for a check that counted something (in --json only)."""

    name: str
    result: str
    detail: str
    counts: Optional[Dict[str, Any]] = None

    @property
    def passed(self) -> bool:
        return self.result != "FAIL"

    def line(self) -> str:
        return f"{self.result}  {self.name}: {self.detail}"


def _magnus_extensions_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("magnus_extensions") is not None


RACE_WRITERS, RACE_ROUNDS = 16, 20  # check's defaults: a few seconds on loopback (moto, ministack)
# The race's bodies, two rounds (a create, an update) of each in turn: a small one and one of a run log's size
# (a 1000-step log is 330 KB): a server may store a large body in two steps where it stores a small one in one.
RACE_BODY_SIZES = {"small": 0, "256 KiB": 256 * 1024}
# Seconds: a slow endpoint ends the race early, with the rounds done so far (SeaweedFS makes the losers
# of a race retry its lock once a second: a round of 16 writers there takes up to 8 s).
_RACE_DEADLINE = 30.0


class _Skipped(Exception):
    """A check that cannot be made here, and why."""


def run_checks(
    client: S3Client, environ: Mapping[str, str], writers: int = RACE_WRITERS, rounds: int = RACE_ROUNDS
) -> List[CheckResult]:
    """Credentials, identity, bucket and region, read/write/delete, listing, conditional writes one at a
    time and raced by concurrent writers, and conditional DELETE. Every scratch write has a condition."""
    results: List[CheckResult] = []
    bucket = client.bucket
    scratch = scratch_key(client.config.key_prefix, "check")

    def check(name: str, action: Callable[[], Union[str, CheckResult]]) -> bool:
        try:
            outcome = action()
        except _Skipped as skipped:
            results.append(CheckResult(name, "SKIP", str(skipped)))
            return True
        except RunlogS3Error as exc:
            results.append(CheckResult(name, "FAIL", exc.message))
            return False
        except Exception as exc:  # a check reports every failure as a line, whatever it is
            results.append(CheckResult(name, "FAIL", f"{type(exc).__name__}: {exc}"))
            return False
        results.append(outcome._replace(name=name) if isinstance(outcome, CheckResult) else
                       CheckResult(name, "PASS", outcome))
        return results[-1].passed

    def credentials() -> str:
        found = client.credentials.get()
        return f"{found.source} (access key {mask_access_key(found.access_key)})"

    def identity() -> str:
        if client.endpoint_url and not resolve_endpoint_url(client.config, environ, "sts"):
            raise _Skipped("custom S3 endpoint and no AWS_ENDPOINT_URL_STS")
        transport = BotocoreTransport(client.config, environ, sts_endpoint_url(client.config, environ))
        return get_caller_identity(client.credentials.get(), client.config, transport, environ)

    def bucket_region() -> str:
        region = client.head_bucket()
        if region and region != client.config.region:
            raise WrongRegionError(
                f"bucket {bucket!r} is in region {region}, not {client.config.region}: set region: {region}",
                bucket_region=region,
            )
        return f"s3://{bucket} exists" + (f" in {region}" if region else "")

    def read_write_delete() -> str:
        body = b'{"check":"runlog-s3"}'
        etag = client.put_object(scratch, body, if_none_match=True)
        if client.get_object(scratch).body != body:
            raise S3Error(f"s3://{bucket}/{scratch} read back different bytes than were written")
        how = "If-Match" if delete_scratch(client, scratch, etag) else "without If-Match, which the server refused"
        return f"put (If-None-Match), get and delete ({how}) of s3://{bucket}/{scratch}"

    def listing() -> str:
        prefix = f"{client.config.key_prefix}/" if client.config.key_prefix else ""
        next(iter(client.list_objects(prefix)), None)
        return f"ListObjectsV2 on s3://{bucket}/{prefix}"

    def conditional_writes() -> str:
        etag = client.put_object(scratch, b"{}", if_none_match=True)
        missing = f"{scratch}-missing"
        try:
            for description, key, options in (
                ("If-None-Match: * on an existing key", scratch, {"if_none_match": True}),
                ("If-Match with a stale ETag", scratch, {"if_match": STALE_ETAG}),
                ("If-Match on a missing key", missing, {"if_match": etag}),
            ):
                try:
                    written = client.put_object(key, b'{"overwritten":true}', **options)
                except (PreconditionFailedError, NotFoundError) as exc:
                    if isinstance(exc, NoSuchBucketError):
                        raise
                    continue
                if key == missing:
                    delete_scratch(client, missing, written)
                raise S3Error(
                    f"the server accepted a PUT with {description}: it ignores conditional writes, so "
                    "parallel writes are NOT safe on this endpoint (use AWS S3, or a server that honours If-Match)"
                )
            if client.get_object(scratch).etag != etag:
                raise S3Error("the object changed although its conditional PUTs were refused")
        finally:
            delete_scratch(client, scratch, etag)
        return ("conditional PUTs on an existing key are refused (412), and If-Match on a missing key too "
                "(412 or 404)")

    def concurrent_conditional_writes() -> CheckResult:
        return race_result(client, race_conditional_writes(client, scratch, writers, rounds))

    def conditional_delete() -> CheckResult:
        found = client.conditional_delete()
        if found.honoured:
            return CheckResult("", "PASS", f"{found.detail}: rm deletes only the version of a run it listed")
        return CheckResult("", "WARN", f"{found.detail}; rm cannot tell a run rewritten while it deletes it "
                                       "(AWS S3 honours If-Match on DELETE since 2025-09)")

    if _magnus_extensions_installed():
        results.append(CheckResult(
            "magnus_extensions", "WARN", "installed beside this store and claims type: s3 and chunked-s3 too: "
            "use type: runlog-s3 or runlog-chunked-s3 (or runlog_s3.S3RunLogStore) in magnus configs"))
    if not check("credentials found", credentials):
        return results
    check("caller identity", identity)
    if check("bucket", bucket_region):
        check("read, write, delete", read_write_delete)
        check("list", listing)
        if check("conditional writes", conditional_writes):
            check("concurrent conditional writes", concurrent_conditional_writes)
        check("conditional delete", conditional_delete)
    return results


def delete_scratch(client: S3Client, key: str, etag: str) -> bool:
    """DELETE a scratch object with If-Match on its ETag; where a server refuses the condition on DELETE
    (400, 501: LocalStack answers 501 NotImplemented), without it, and then False; an object changed
    meanwhile is deleted in the version found by a HEAD."""
    try:
        client.delete_object(key, if_match=etag)
    except PreconditionFailedError:
        try:
            client.delete_object(key, if_match=client.head_object(key).etag)
        except NotFoundError:
            pass
    except NotFoundError:
        pass
    except S3Error as exc:
        if exc.status not in (400, 501):
            raise
        client.delete_object(key)
        return False
    return True


# The race: `writers` threads, each with a client of its own (its own connections, opened before the
# race), PUT to one scratch key per round with the same condition, released together by a barrier with
# their requests already signed. Even rounds create (If-None-Match: *), odd rounds update (If-Match on
# the ETag of an object written just before). Exactly one may win a round; the others must get 412,
# and what is stored must be the winner's body. A server that checks the condition and stores the
# object in two steps lets several win, and all but the last winner's write are lost.

class RaceOutcome(NamedTuple):
    """One writer's PUT in one round: won (2xx), refused (412), or an error; retried when the first
    reply asked for a retry (409 ConditionalRequestConflict, 503 SlowDown...) or was lost."""

    won: bool = False
    refused: bool = False
    error: str = ""
    retried: bool = False
    server: str = ""  # the reply's Server header


def _client_like(client: S3Client) -> S3Client:
    """A client for the same bucket with the same credentials and connections of its own."""
    return S3Client(client.config, client.credentials, environ=client._environ)


def _race_put(client: S3Client, key: str, body: bytes, etag: str, barrier: threading.Barrier) -> RaceOutcome:
    """One writer's turn in a round: sign, wait for the others, send."""
    headers = client.put_headers(if_match=etag, if_none_match=not etag)
    if client.config.expected_bucket_owner:
        headers["x-amz-expected-bucket-owner"] = client.config.expected_bucket_owner
    request = sign_request("PUT", client.object_url(key), headers, body, client.credentials.get(),
                           client.config.region, "s3")
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        return RaceOutcome(error="the writers were not all ready (a writer failed or the race was stopped)")
    server = ""
    try:
        reply = client.transport.send(request)
    except _transport_errors() as exc:
        if not classify_transport_error(exc).retry:
            return RaceOutcome(error=f"PUT s3://{client.bucket}/{key}: {classify_transport_error(exc).what} "
                                     f"({type(exc).__name__}: {_first_line(exc)})")
    else:
        server = reply.header("Server")
        if 200 <= reply.status < 300:
            return RaceOutcome(won=True, server=server)
        error = _error_from_reply(reply, operation="PUT", bucket=client.bucket, key=key,
                                  region=client.config.region, method="PUT")
        if isinstance(error, PreconditionFailedError):
            return RaceOutcome(refused=True, server=server)
        if error.status not in _RETRYABLE_STATUS and error.code not in _RETRYABLE_CODES:
            return RaceOutcome(error=error.message, server=server)
    # Retried as the store would, with backoff. The first PUT may have landed: a refused retry whose
    # body is what is stored counts as the winner (see _count_round).
    try:
        client.put_object(key, body, if_match=etag, if_none_match=not etag)
    except PreconditionFailedError:
        return RaceOutcome(refused=True, retried=True, server=server)
    except RunlogS3Error as exc:
        return RaceOutcome(error=exc.message, retried=True, server=server)
    return RaceOutcome(won=True, retried=True, server=server)


def race_size(round_number: int) -> str:
    """Which of RACE_BODY_SIZES round `round_number` sends: each in turn, a create and an update of each."""
    return list(RACE_BODY_SIZES)[(round_number // 2) % len(RACE_BODY_SIZES)]


def race_body(round_number: int, writer: int) -> bytes:
    """What writer `writer` PUTs in round `round_number`: a body no other writer or round sends, of the round's
    size (race_size)."""
    body = json.dumps({"check": "runlog-s3", "round": round_number, "writer": writer, "padding": ""},
                      separators=(",", ":")).encode()
    return body.replace(b'"padding":""', b'"padding":"' + b"x" * max(0, RACE_BODY_SIZES[race_size(round_number)] - len(
        body)) + b'"')


def race_conditional_writes(
    client: S3Client, key_base: str, writers: int = RACE_WRITERS, rounds: int = RACE_ROUNDS,
    deadline: float = _RACE_DEADLINE,
) -> Dict[str, Any]:
    """Race `writers` concurrent conditional PUTs for `rounds` rounds; returns the counts (see race_result)."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.monotonic()
    clients = [_client_like(client) for _ in range(writers)]
    kinds: Dict[str, Counter] = {"If-None-Match: *": Counter(), "If-Match": Counter()}
    sizes: Dict[str, Counter] = {size: Counter() for size in RACE_BODY_SIZES}
    counts: Dict[str, Any] = {
        "server": client.endpoint_url or f"AWS S3 ({client.config.region})", "server_header": "",
        "writers": writers, "rounds_asked": rounds, "rounds": 0, "rounds_with_several_winners": 0,
        "rounds_with_no_winner": 0, "rounds_keeping_a_loser": 0, "most_winners": 0, "winners": 0, "refused": 0,
        "retried": 0, "errors": 0, "first_error": "", "slowest_round_seconds": 0.0, "by_condition": kinds,
        "by_body_size": sizes,
    }
    with ThreadPoolExecutor(max_workers=writers, thread_name_prefix="runlog-s3-race") as pool:
        list(pool.map(lambda each: each.head_bucket(), clients))  # connections open before the first round
        for number in range(rounds):
            if time.monotonic() - started > deadline:
                break
            key = f"{key_base}-race-{number:03d}"
            kind = "If-None-Match: *" if number % 2 == 0 else "If-Match"
            etag = client.put_object(key, race_body(number, -1), if_none_match=True) if kind == "If-Match" else ""
            barrier = threading.Barrier(writers, timeout=60)
            round_started = time.monotonic()
            try:
                outcomes = list(pool.map(_race_put, clients, [key] * writers,
                                         [race_body(number, writer) for writer in range(writers)],
                                         [etag] * writers, [barrier] * writers))
            except BaseException:
                barrier.abort()  # the writers still waiting give up at once (Ctrl-C)
                raise
            counts["slowest_round_seconds"] = round(max(counts["slowest_round_seconds"],
                                                        time.monotonic() - round_started), 2)
            try:
                stored: Optional[S3Object] = client.get_object(key)
            except NotFoundError:
                stored = None
            _count_round(counts, kinds[kind], outcomes, stored, number, sizes[race_size(number)])
            if stored is not None:
                delete_scratch(client, key, stored.etag)
            if counts["errors"]:
                break
    counts["seconds"] = round(time.monotonic() - started, 2)
    counts["by_condition"] = {kind: dict(kind_counts) for kind, kind_counts in kinds.items()}
    counts["by_body_size"] = {size: dict(size_counts) for size, size_counts in sizes.items()}
    return counts


def _count_round(
    counts: Dict[str, Any], kind: Counter, outcomes: List[RaceOutcome], stored: Optional[S3Object], number: int,
    size: Optional[Counter] = None,
) -> None:
    winners = {writer for writer, outcome in enumerate(outcomes) if outcome.won}
    # -1: the object written before an If-Match round; -2: none (no writer of an If-None-Match round won)
    stored_writer = int(json.loads(stored.body).get("writer", -2)) if stored is not None else -2
    if 0 <= stored_writer < len(outcomes) and outcomes[stored_writer].retried:
        winners.add(stored_writer)  # its first PUT landed, the reply asked for a retry, the retry was refused
    errors = [outcome.error for outcome in outcomes if outcome.error]
    counts["server_header"] = counts["server_header"] or next((o.server for o in outcomes if o.server), "")
    counts["rounds"] += 1
    tallies = [kind] + ([size] if size is not None else [])
    for tally in tallies:
        tally["rounds"] += 1
    counts["winners"] += len(winners)
    counts["refused"] += sum(outcome.refused for writer, outcome in enumerate(outcomes) if writer not in winners)
    counts["retried"] += sum(outcome.retried for outcome in outcomes)
    counts["most_winners"] = max(counts["most_winners"], len(winners))
    if errors:
        counts["errors"] += len(errors)
        counts["first_error"] = counts["first_error"] or f"round {number}: {errors[0]}"
        return
    for outcome, happened in (("rounds_with_several_winners", len(winners) > 1), ("rounds_with_no_winner", not winners),
                              ("rounds_keeping_a_loser", bool(winners) and stored_writer not in winners)):
        counts[outcome] += happened
        for tally in tallies:
            tally[outcome] += happened


def race_result(client: S3Client, counts: Dict[str, Any]) -> CheckResult:
    """The check line for a race's counts: FAIL when a round had several winners, none, or kept a
    refused writer's body, or when the race could not be run to the end."""
    server = counts["server"] + (f" ({counts['server_header']})" if counts["server_header"] else "")
    done, writers = counts["rounds"], counts["writers"]
    by_kind = ", ".join(f"{kind} in {each.get('rounds_with_several_winners', 0)} of {each.get('rounds', 0)}"
                        for kind, each in [*counts["by_condition"].items(), *(
                            (f"{size} bodies", each) for size, each in counts.get("by_body_size", {}).items())])
    if counts["rounds_with_several_winners"]:
        return CheckResult("", "FAIL", (
            f"{server}: conditional writes are not atomic under concurrency: {counts['rounds_with_several_winners']} "
            f"of {done} rounds had 2 or more winners; writes can be lost on this server ({writers} concurrent "
            f"writers, up to {counts['most_winners']} winners in a round; {by_kind})"), counts)
    if counts["errors"]:
        return CheckResult("", "FAIL", f"{server}: the race of {writers} concurrent conditional writers stopped in round "
                                       f"{done}: {counts['first_error']}", counts)
    if counts["rounds_with_no_winner"] or counts["rounds_keeping_a_loser"]:
        return CheckResult("", "FAIL", (
            f"{server}: conditional writes are not reliable under concurrency: in {counts['rounds_with_no_winner']} "
            f"of {done} rounds all {writers} writers were refused, in {counts['rounds_keeping_a_loser']} the object "
            "kept a refused writer's body; writes can be lost on this server"), counts)
    shortfall = (f" (the race stops after {_RACE_DEADLINE:.0f} s: {done} of {counts['rounds_asked']} rounds asked)"
                 if done < counts["rounds_asked"] else "")
    slow = counts["slowest_round_seconds"]
    waits = f"; the losers of a race waited: a round took up to {slow:.1f} s" if slow >= 1 else ""
    return CheckResult("", "PASS", (
        f"{writers} concurrent writers, {done} rounds of If-None-Match: * and If-Match on one ETag, small bodies and "
        f"{list(RACE_BODY_SIZES)[-1]}: exactly one winner a round, the others refused (412), in "
        f"{counts['seconds']:.1f} s{shortfall}{waits}"), counts)


def _report_checks(results: List[CheckResult], as_json: bool = False) -> int:
    if as_json:
        print(json.dumps([{name: value for name, value in result._asdict().items() if value is not None}
                          for result in results], indent=2))
    else:
        for result in results:
            print(result.line(), flush=True)
    return EXIT_OK if results and all(result.passed for result in results) else EXIT_FAILED


# check --local: the checks and a parallel write workload on an embedded server ####################
#
# Writer processes (forked, or spawned where fork is not there) each write a branch of steps through the
# store; the run is then read back whole and every log counted.

def _local_writer(config: Dict[str, Any], run_id: str, writer: int, steps: int) -> None:
    """One writer process of `check --local`: a branch of steps and a parameter, through the store."""
    import signal

    import runlog_s3  # the store class is built lazily, with magnus when it is there

    # Ctrl-C reaches the whole group: the parent stops us. Until here a Ctrl-C was only noted (the
    # parent's _SigintHeld handler, inherited), so none can interrupt this process.
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    store = runlog_s3.S3RunLogStore(config)
    branch_name = f"fan-out.writer-{writer:02d}"
    branch = store.create_branch_log(branch_name)
    _set(branch, "status", "PROCESSING")
    store.add_branch_log(branch, run_id)
    for number in range(steps):
        step = store.create_step_log(f"step-{number:02d}", f"{branch_name}.step-{number:02d}")
        _set(step, "status", "SUCCESS")
        store.add_step_log(step, run_id)
    store.set_parameters(run_id, {f"writer_{writer:02d}": writer})
    _set(branch, "status", "SUCCESS")
    store.add_branch_log(branch, run_id)


class _SigintHeld:
    """Ctrl-C held while writer processes are forked, then raised. Python drops a KeyboardInterrupt
    raised in its fork hooks ("Exception ignored in _releaseLock"): a Ctrl-C landing in a fork was lost
    and the command wrote on for minutes. Held here, a handler only notes it (in whichever hook or
    child it lands), and it is raised once the forks are done; each child ignores it from its start."""

    def __init__(self) -> None:
        self.pressed = False
        self._previous: Any = None

    def _note(self, signum: int, frame: Any) -> None:
        self.pressed = True

    def __enter__(self) -> _SigintHeld:
        import signal

        if threading.current_thread() is threading.main_thread():  # only the main thread sets handlers
            self._previous = signal.signal(signal.SIGINT, self._note)
        return self

    def __exit__(self, exc_type: Any, *exc_info: Any) -> None:
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.pressed and exc_type is None:
            raise KeyboardInterrupt


def _stop_processes(processes: List[Any], grace: float = 5.0) -> None:
    """Terminate started processes, wait up to `grace` seconds for all of them, then kill what is left."""
    for process in processes:
        if process.pid is not None and process.is_alive():
            process.terminate()
    deadline = time.monotonic() + grace
    for process in processes:
        if process.pid is not None:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join(5)


def _set(log: Any, name: str, value: Any) -> None:
    if isinstance(log, dict):
        log[name] = value
    else:
        setattr(log, name, value)


def run_local_workload(config: Dict[str, Any], writers: int = 16, steps: int = 10) -> Tuple[Dict[str, Any], int, int]:
    """Writers in parallel processes on one run log; returns (run log, logs written, logs kept)."""
    import multiprocessing

    import runlog_s3

    store = runlog_s3.S3RunLogStore(config)
    run_id = f"check-local-{random.getrandbits(32):08x}"
    store.create_run_log(run_id, status="PROCESSING")
    fan_out = store.create_step_log("fan-out", "fan-out")
    _set(fan_out, "status", "PROCESSING")
    store.add_step_log(fan_out, run_id)
    processes = [
        multiprocessing.Process(target=_local_writer, args=(config, run_id, writer, steps)) for writer in range(writers)
    ]
    try:
        with _SigintHeld():
            for process in processes:
                process.start()
        for process in processes:
            process.join(timeout=300)
            if process.is_alive():
                process.terminate()
    except KeyboardInterrupt:
        _stop_processes(processes)
        raise
    fan_out = store.get_step_log("fan-out", run_id)
    _set(fan_out, "status", "SUCCESS")
    store.add_step_log(fan_out, run_id)
    store.update_run_log_status(run_id, "SUCCESS")
    document = store.run_logs.read(run_id)
    branches = find_step(document, "fan-out").get("branches", {})
    kept = sum(len(branch.get("steps", {})) for branch in branches.values()) + len(document.get("parameters", {}))
    return document, writers * (steps + 1), kept


def _cmd_check_local(values: Dict[str, Any], args: Any) -> int:
    print("checking against an embedded S3 server", file=sys.stderr if args.json else sys.stdout)
    with LocalS3Server() as server:
        # The embedded server accepts any credentials; name variables of our own so none of the
        # user's are sent anywhere, and so forked writers find them.
        os.environ[_LOCAL_KEY_NAMES[0]] = "runlog-s3-local-key"
        os.environ[_LOCAL_KEY_NAMES[1]] = "runlog-s3-local-secret"
        os.environ["AWS_ENDPOINT_URL_STS"] = server.endpoint_url
        config = {
            "s3_bucket": _LOCAL_BUCKET,
            "region": values.get("region") or "eu-west-1",
            "prefix": values.get("prefix") or "",
            "endpoint_url": server.endpoint_url,
            "use_credentials": True,
            "aws_access_key_name": _LOCAL_KEY_NAMES[0],
            "aws_secret_access_key_name": _LOCAL_KEY_NAMES[1],
        }
        client = S3Client(Config.from_dict(config))
        create_bucket(client)
        print(f"embedded server {server.endpoint_url}, bucket {_LOCAL_BUCKET}", file=sys.stderr if args.json else sys.stdout)
        results = run_checks(client, os.environ, args.writers, args.rounds)
        if not all(result.passed for result in results):
            return _report_checks(results, args.json)
        if not args.json:
            _report_checks(results, False)
        started = time.monotonic()
        document, written, kept = run_local_workload(config, writers=args.writers, steps=args.steps)
        elapsed = time.monotonic() - started
        if not args.json and args.verbose:  # the run the writers made, two steps a branch
            print("\n".join(render_tree(document, color=use_color(sys.stdout), limit=2)))
        detail = f"{args.writers} writer processes wrote {written} logs, {kept} kept, {written - kept} lost, in {elapsed:.1f} s"
        workload = [CheckResult("parallel writes", "PASS" if kept == written else "FAIL", detail)]
        return _report_checks(results + workload if args.json else workload, args.json)


# serve: an S3 server on loopback to try pipelines on ##############################################


_SERVE_PORT = 9455  # fixed, so that the block pasted into a config keeps working from one serve to the next
_LOCAL_KEYS = "AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local"


def _cmd_serve(args: Any) -> int:
    """An S3 server to try pipelines on: moto's, in this process, on loopback, with a bucket made;
    prints the run_log_store block and the environment to paste, and serves until Ctrl-C (exit 0)."""
    import signal

    values = cli_config_values(args, {})  # its flags (and --config), not the RUNLOG_S3_* of a real bucket
    config = Config.from_dict({"s3_bucket": values.get("s3_bucket") or _LOCAL_BUCKET,
                               "prefix": values.get("prefix") or "", "region": values.get("region") or "eu-west-1"})
    port = _SERVE_PORT if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a port: give 1 to 65535, or 0 for a free one")
    server = LocalS3Server(port=port)
    stop = threading.Event()
    try:
        block = {**_config_block(config), "endpoint_url": server.endpoint_url}
        keys = {"aws_access_key_name": "LOCAL_KEY", "aws_secret_access_key_name": "LOCAL_SECRET"}  # any key works
        create_bucket(S3Client(Config.from_dict({**block, **keys, "use_credentials": True}),
                               environ={"LOCAL_KEY": "local", "LOCAL_SECRET": "local"}))
        variables = [f"RUNLOG_S3_BUCKET={config.s3_bucket}", f"RUNLOG_S3_ENDPOINT_URL={server.endpoint_url}"]
        variables += [f"RUNLOG_S3_{key.upper()}={block[key]}" for key in ("prefix", "region") if key in block]
        print(f"runlog-s3: an S3 server at {server.endpoint_url} with bucket {config.s3_bucket} (moto, in memory: "
              "what it holds is gone when it stops)\n"
              "\n# the run log store of your magnus config (config.yaml):\n"
              "run_log_store:\n  type: s3\n  config:\n"
              + "".join(f"    {key}: {value}\n" for key, value in block.items())
              + "\n# the environment, in each shell that runs magnus or runlog-s3 (any key works here; a new shell "
              "keeps your own):\n"
              f"export {_LOCAL_KEYS}\nexport {' '.join(variables)}\n"
              "\nserving until Ctrl-C", flush=True)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda number, frame: stop.set())
        while not stop.wait(1.0):
            pass
    finally:
        server.stop()
    print(f"runlog-s3: stopped the server at {server.endpoint_url}", file=sys.stderr)
    return EXIT_OK


def _config_block(config: Config) -> Dict[str, Any]:
    """The keys of a config block a user writes for `config`: the bucket, and prefix and region when
    they are not the defaults."""
    block: Dict[str, Any] = {"s3_bucket": config.s3_bucket}
    if config.key_prefix:
        block["prefix"] = config.key_prefix
    if config.region != "eu-west-1":
        block["region"] = config.region
    return block


# The parser and the command line's main ###########################################################
#
# argparse, one parser for every command; _main turns every error into one line and an exit code.

def _count_of(noun: str) -> Callable[[str], int]:
    """An argparse type: a whole number of `noun`, 1 or more (0 or less would make a check pass vacuously)."""

    def count(text: str) -> int:
        import argparse

        try:
            number = int(text)
        except ValueError:
            number = 0
        if number < 1:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number of {noun}: give 1 or more")
        return number

    return count


def _parser() -> Any:
    import argparse

    try:
        columns = int(os.environ.get("COLUMNS") or os.get_terminal_size().columns)
    except (ValueError, OSError):
        columns = 80

    class Formatter(argparse.HelpFormatter):
        # argparse makes a formatter for every argument added, each asking shutil for the terminal's
        # size: 3 ms of a 100 ms `get`. Asked once here.
        def __init__(self, prog: str, **options: Any):
            options.setdefault("width", max(columns - 2, 40))
            super().__init__(prog, **options)

    # The options are accepted before or after the command; SUPPRESS keeps a command's parser from
    # resetting what was given before it.
    class Parser(argparse.ArgumentParser):
        def error(self, message: str) -> NoReturn:
            # A mistyped command: what it may have meant, in our one line (argparse lists every command).
            found = re.match(r"argument COMMAND: invalid choice: '(.*?)'", message)
            if found:
                import difflib

                near = difflib.get_close_matches(found[1], list(commands.choices), n=1)
                message = (f"unknown command {found[1]!r}" + (f"; did you mean {near[0]!r}?" if near else "")
                           + f" ({self.prog} --help lists the commands)")
            super().error(message)

    common = Parser(add_help=False, argument_default=argparse.SUPPRESS, formatter_class=Formatter)
    common.add_argument("--config", metavar="FILE", help="a magnus config file (YAML or JSON), e.g. config.yaml, "
                        "or runnable's runnable-config.yaml; its run log store's config is used")
    common.add_argument("--bucket", help="the bucket, e.g. my-runs or s3://my-runs/magnus (env RUNLOG_S3_BUCKET)")
    common.add_argument("--prefix", help="the key prefix, e.g. magnus/runs (env RUNLOG_S3_PREFIX)")
    common.add_argument("--region", help="the bucket's region, e.g. us-east-1 (env RUNLOG_S3_REGION; default eu-west-1)")
    common.add_argument("--profile", help="an AWS profile, e.g. prod (env RUNLOG_S3_PROFILE; default: the default chain)")
    common.add_argument("--endpoint-url", dest="endpoint_url", help="an S3-compatible endpoint, e.g. "
                        "http://127.0.0.1:9000 (env RUNLOG_S3_ENDPOINT_URL)")
    common.add_argument("-v", "--verbose", action="count", help="log to stderr (-vv for debug)")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    parser = Parser(
        prog="runlog-s3",
        description="Read and manage magnus run logs kept in S3 by runlog_s3.",
        epilog="Exit codes: 0 ok, 1 not found, exists or check failed, 2 usage or configuration error, 130 "
               "interrupted (Ctrl-C; serve stops with 0), 141 output cut short (| head).",
        parents=[common],
        formatter_class=Formatter,
    )
    parser.add_argument("--version", action="version", version=f"runlog-s3 {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)

    def command(name: str, help: str) -> Any:
        return commands.add_parser(name, help=help, description=help, parents=[common], formatter_class=Formatter)

    run_id_help = "the run's id, as magnus prints it (e.g. 20261125-101500-ab12)"
    get = command("get", help="print a run log as JSON")
    get.add_argument("run_id", help=run_id_help)
    get.add_argument("--compact", action="store_true", help="one line instead of indented")
    get.add_argument("--etag", action="store_true", help="also print the ETag on stderr, for put --if-match")
    ls = command("ls", help="list runs, oldest first: run id, status, layout, last modified, size, written by")
    ls.add_argument("--limit", type=_count_of("runs"), default=0, metavar="N", help="only the newest N (e.g. --limit 20)")
    ls.add_argument("--json", action="store_true", help="a JSON list: run_id, status, layout, written_by, last_modified, "
                    "size, objects")
    ls.add_argument("--since", default="", metavar="AGE", help="only runs written within AGE, e.g. 7d, 12h, 30m (s, m, h, "
                    "d, w); a chunked-s3 run is timed by its RunLog.json. With --since, --status or --limit the runs "
                    "come from one LIST and a GET per run shown; a chunked-s3 run's size is not counted (-)")
    ls.add_argument("--status", default="", metavar="STATUSES", help="only runs with these statuses, comma-separated, "
                    f"e.g. FAIL or SUCCESS,FAIL (of {', '.join(LISTABLE_STATUSES)})")
    show = command("show", help="a run log as a tree of steps and branches")
    show.add_argument("run_id", help=run_id_help)
    show.add_argument("--json", action="store_true", help="the tree as JSON: run_id, status, written_by, steps[name, "
                      "internal_name, status, step_type, attempts, branches[internal_name, status, steps]]")
    put = command("put", help="write a run log from FILE or stdin, validated, with compare-and-swap")
    put.add_argument("run_id", help=run_id_help)
    put.add_argument("file", nargs="?", help="a JSON file, e.g. one `get` wrote (default: stdin)")
    put.add_argument("--create", action="store_true", help="refuse to replace an existing run log")
    put.add_argument("--force", action="store_true", help="replace an existing run log whatever it holds now")
    put.add_argument("--if-match", dest="if_match", default="", metavar="ETAG", help="replace only if the ETag is still this")
    put.add_argument(
        "--layout", choices=sorted(LAYOUTS), default=None,
        help="the layout of a new run (default: the --config file's store type, else s3)",
    )
    edit = command("edit", help="edit a run log in $VISUAL/$EDITOR, written back with compare-and-swap")
    edit.add_argument("run_id", help=run_id_help)
    timeline = command("timeline", help="a run's steps and branches on the wall clock, as a Gantt chart of text")
    timeline.add_argument("run_id", help=run_id_help)
    timeline.add_argument("--width", type=_count_of("columns"), default=60, metavar="N", help="bar width in columns "
                          "(default 60)")
    timeline.add_argument("--html", metavar="FILE", default="", help="write one self-contained HTML page instead, "
                          "e.g. run.html ('-' for stdout)")
    timeline.add_argument("--open", action="store_true", help="open the page in a browser, when there is one (without "
                          "--html, a page written to the temporary folder)")
    timeline.add_argument("--json", action="store_true", help="the rows as JSON: name, kind, depth, status, start, end "
                          "(UTC), duration_seconds, attempts, failed_attempts, critical")
    rm = command("rm", help="delete a run log (every object of a chunked-s3 run)")
    rm.add_argument("run_id", help=run_id_help)
    rm.add_argument("--yes", action="store_true", help="do not ask")
    rm.add_argument("--force", action="store_true",
                    help="delete a run that is not finished (CREATED or PROCESSING: a pipeline may be writing it)")
    prune = command("prune", help="delete whole runs last written before AGE, finished ones only (SUCCESS, FAIL), "
                    "each with a delete conditioned on the version checked; says what it deleted and what it kept")
    prune.add_argument("--older-than", dest="older_than", required=True, metavar="AGE",
                       help="e.g. 90d, 12h (s, m, h, d, w): a run's age is its last write (a chunked-s3 run's newest object)")
    prune.add_argument("--status", default="SUCCESS,FAIL", metavar="STATUSES",
                       help="delete only runs with these statuses (default SUCCESS,FAIL; never CREATED or PROCESSING)")
    prune.add_argument("--dry-run", dest="dry_run", action="store_true", help="say what would be deleted; delete nothing")
    prune.add_argument("--yes", action="store_true", help="do not ask (needed when stdin is not a terminal)")
    export = command("export", help="write runs to one self-describing JSON file (each run log whole, with its layout "
                     "and written-by tag), for import into another bucket, prefix or layout")
    export.add_argument("run_ids", nargs="+", metavar="RUN_ID", help=run_id_help)
    export.add_argument("-o", "--output", default="-", metavar="FILE", help="the file to write, whole or not at all "
                        "(default '-': stdout)")
    import_ = command("import", help="write the runs of an export file into the configured bucket, prefix and layout, "
                      "each with If-None-Match: never over an existing run unless --force")
    import_.add_argument("file", metavar="FILE", help="a file export wrote ('-' for stdin)")
    import_.add_argument("--force", action="store_true", help="replace runs that exist, as put --force does (atomically "
                         "on chunked-s3)")
    import_.add_argument("--layout", choices=sorted(LAYOUTS), default=None, help="the layout of the runs it creates "
                         "(default: the --config file's store type, else the layout each run was exported from)")
    check = command("check", help="verify credentials, bucket, permissions and conditional writes")
    check.add_argument("--local", action="store_true", help="against an embedded S3 server, with a parallel write workload")
    check.add_argument("--writers", type=_count_of("writer processes"), default=RACE_WRITERS, metavar="N",
                       help=f"concurrent writers racing conditional writes, and with --local the writer processes of "
                       f"its workload (default {RACE_WRITERS})")
    check.add_argument("--rounds", type=_count_of("rounds"), default=RACE_ROUNDS, metavar="N",
                       help=f"rounds of the race of conditional writes, alternately If-None-Match and If-Match "
                       f"(default {RACE_ROUNDS})")
    check.add_argument("--steps", type=_count_of("steps"), default=10, help="step logs per writer for --local (default 10)")
    check.add_argument("--json", action="store_true", help="a JSON list: name, result (PASS, FAIL, SKIP, WARN), detail, "
                       "and counts where a check counted (the race's rounds and winners)")
    serve = command("serve", help="an S3 server on loopback to try pipelines on (moto, in memory), with a bucket; "
                    "prints the config block and environment to paste; stops at Ctrl-C")
    serve.add_argument("--port", type=int, default=None, metavar="N", help=f"the port (default {_SERVE_PORT}; 0: a free "
                       "one); --bucket, --prefix, --region name the bucket (default runlog-s3-local)")
    register = command("register", help="let magnus and runnable find a copied-in runlog_s3.py: write its .dist-info beside it")
    register.add_argument("--folder", default="", help="the folder runlog_s3.py was copied into (default: this "
                          "module's), e.g. /app")
    return parser


def _main(argv: Optional[List[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """The command line; returns the exit code."""
    environ = os.environ if environ is None else environ
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):  # runlog-s3 alone: what it does and how
        parser.print_help()
        return EXIT_OK
    for name, default in (("config", None), ("verbose", 0), ("debug", False), ("layout", None), ("json", False),
                          ("config_layout", None)):
        setattr(args, name, getattr(args, name, default))
    commands = {"get": _cmd_get, "ls": _cmd_ls, "show": _cmd_show, "put": _cmd_put, "edit": _cmd_edit, "rm": _cmd_rm,
                "timeline": _cmd_timeline}
    commands.update({"prune": _cmd_prune, "export": _cmd_export, "import": _cmd_import})
    try:
        try:
            level = log_level_from(environ)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if args.verbose:
            level = min(level, logging.DEBUG if args.verbose > 1 else logging.INFO)
            logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        logger.setLevel(level)
        if args.command == "register":
            return _cmd_register(args)
        if args.command == "serve":
            return _cmd_serve(args)
        values = cli_config_values(args, environ)
        if args.command == "check" and args.local:
            return _cmd_check_local(values, args)
        if args.command == "check" and not values.get("s3_bucket"):
            raise ConfigError("no bucket to check: pass --bucket, set RUNLOG_S3_BUCKET, or --config a magnus config "
                              "file; check --local checks against an embedded S3 server instead")
        client = S3Client(cli_config(values), environ=environ)
        if sys.stderr.isatty() or args.verbose:
            client.on_retry = _retry_notice()
        if args.command == "check":
            return _report_checks(run_checks(client, environ, args.writers, args.rounds), args.json)
        return commands[args.command](BucketRuns(client), args)
    except (RunLogNotFoundError, NotFoundError) as exc:
        return _fail(exc, EXIT_FAILED, args.debug)
    except (ConfigError, InvalidRunIdError, UsageError, CredentialsError) as exc:
        return _fail(exc, EXIT_USAGE, args.debug)
    except InvalidRunLogError as exc:
        return _fail(exc, EXIT_USAGE if args.command == "put" else EXIT_FAILED, args.debug)
    except RunlogS3Error as exc:
        return _fail(exc, EXIT_FAILED, args.debug)
    except KeyboardInterrupt:
        # A Ctrl-C in the middle of an import leaves half-made objects whose finalizers complain at exit.
        sys.unraisablehook = lambda unraisable: None
        print("runlog-s3: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # main() ends quietly
    except Exception as exc:  # a defect of ours: still one line, the traceback with --debug
        return _fail(RunlogS3Error(f"unexpected {type(exc).__name__}: {_first_line(exc)} (--debug shows where)"),
                     EXIT_FAILED, args.debug, exc)


# register: a copied-in runlog_s3.py made findable by magnus and runnable ##########################


_REGISTERED_SUMMARY = "registered by python -m runlog_s3 register for a copied-in runlog_s3.py"


def register(folder: str) -> str:
    """Write runlog_s3-<version>.dist-info beside a copied-in runlog_s3.py, so that magnus and runnable
    (which find stores only through entry points) find every store name and integration; returns its path.
    Running it again rewrites it; deleting the folder undoes it."""
    from importlib import metadata

    folder = os.path.abspath(folder)
    if not os.path.isfile(os.path.join(folder, "runlog_s3.py")):
        raise UsageError(f"{folder} holds no runlog_s3.py: register the folder the module was copied into (--folder)")
    target = os.path.join(folder, f"runlog_s3-{__version__}.dist-info")
    for distribution in metadata.distributions():
        name = (distribution.metadata["Name"] or "").lower().replace("_", "-")
        if name != "runlog-s3":
            continue
        where = os.path.abspath(str(distribution.locate_file("")))
        registered = _REGISTERED_SUMMARY in (distribution.metadata["Summary"] or "")
        if registered and where == folder:
            continue  # our own earlier register: rewritten below
        if registered:
            raise UsageError(f"a runlog_s3.py registered in {where} is on the path already: magnus and runnable find "
                             f"the store through it; nothing written (delete {where}/runlog_s3-{distribution.version}"
                             ".dist-info to use this copy)")
        # pip's own .dist-info, even in this folder (runlog_s3.py in site-packages): never overwritten,
        # or pip would find its records gone.
        raise UsageError(f"runlog-s3 {distribution.version} is installed in {where} already: magnus and "
                         "runnable find the store through it; nothing written (pip uninstall runlog-s3 to use the copy)")
    files = {"METADATA": f"Metadata-Version: 2.1\nName: runlog-s3\nVersion: {__version__}\n"
                         f"Summary: {_REGISTERED_SUMMARY}\n",
             "entry_points.txt": entry_points_text()}
    dist_info = os.path.basename(target)
    files["RECORD"] = "".join(f"{dist_info}/{name},,\n" for name in [*files, "RECORD"]) + "runlog_s3.py,,\n"
    try:
        os.makedirs(target, exist_ok=True)
        for name, text in files.items():
            with open(os.path.join(target, name), "w", encoding="utf-8") as stream:
                stream.write(text)
    except OSError as exc:
        raise UsageError(f"cannot write {target}: {exc.strerror}; run register where the folder is writable") from exc
    return target


def _cmd_register(args: Any) -> int:
    import shlex
    import site

    target = register(args.folder or os.path.dirname(os.path.abspath(__file__)))
    folder = os.path.dirname(target)
    names = ", ".join(STORE_NAMES)
    print(f"wrote {target} (METADATA, entry_points.txt, RECORD): magnus and runnable find type: {names} and this module's "
          f"integrations when {folder} is on their path; delete that folder to undo")
    site_folders = [*site.getsitepackages(), site.getusersitepackages()]
    if any(os.path.abspath(path) == folder for path in site_folders):
        print(f"{folder} is this Python's site-packages: magnus and runnable find it as they are")
        return EXIT_OK
    # Their console scripts put their own bin folder on the path, not the current folder: without this,
    # `magnus execute` run beside runlog_s3.py fails with stevedore's NoMatches.
    print(f"magnus and runnable do not look in the current folder: run them with {folder} on PYTHONPATH, e.g.\n"
          f"  PYTHONPATH={shlex.quote(folder)} magnus execute --file pipeline.yaml --config-file config.yaml\n"
          f"(in a Dockerfile: ENV PYTHONPATH={folder})")
    return EXIT_OK


# What the person at the terminal is told, and the console script ##################################


def _retry_notice() -> Callable[[str, int, float], None]:
    # A person waiting hears why, once the wait passes about a second; a pipeline's log stays quiet.
    started = time.monotonic()

    def notice(message: str, attempt: int, delay: float) -> None:
        if time.monotonic() - started + delay >= 1.0:
            print(f"runlog-s3: {message}", file=sys.stderr, flush=True)

    return notice


def _fail(error: RunlogS3Error, code: int, debug: bool, cause: Optional[BaseException] = None) -> int:
    if debug:
        import traceback

        shown = cause or error
        traceback.print_exception(type(shown), shown, shown.__traceback__)
    print(f"runlog-s3: error: {error.message}", file=sys.stderr)
    return code


def main() -> None:
    """Console script `runlog-s3`."""
    try:
        code = _main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`| head`): stop quietly, as git does, and let nothing flush again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = EXIT_BROKEN_PIPE
    sys.exit(code)


if __name__ == "__main__":
    main()
