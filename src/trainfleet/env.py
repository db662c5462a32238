"""Environment variables trainfleet reads or sets, defined once (all prefixed ``TRAINFLEET_``)."""

# Read by the CLI.
URL = "TRAINFLEET_URL"  # coordinator base URL, e.g. http://127.0.0.1:8470
TOKEN = "TRAINFLEET_TOKEN"  # operator token for operator / read commands
JOIN_TOKEN = "TRAINFLEET_JOIN_TOKEN"  # token a worker presents to register
STATE_DIR = "TRAINFLEET_STATE_DIR"  # coordinator state dir (db, artifacts, tokens)
HOST = "TRAINFLEET_HOST"  # worker host name override
CA_CERT = "TRAINFLEET_CA_CERT"  # PEM CA certificate to trust for an https coordinator
MIN_FREE_BYTES = "TRAINFLEET_MIN_FREE_BYTES"  # a worker claims only with this much free
# Set by trainfleet.testing on every worker it starts (jobs inherit it), to find strays.
HARNESS_TAG = "TRAINFLEET_HARNESS_TAG"

# Set by the worker for every job process it starts.
JOB_ID = "TRAINFLEET_JOB_ID"
JOB_NAME = "TRAINFLEET_JOB_NAME"
ATTEMPT = "TRAINFLEET_ATTEMPT"
MODE = "TRAINFLEET_MODE"  # the job's mode (manifest `mode`)
OUTPUT_DIR = "TRAINFLEET_OUTPUT_DIR"  # everything written here is packed and uploaded
NUM_THREADS = "TRAINFLEET_NUM_THREADS"  # CPU threads the job may use
# The worker's data settings (`trainfleet join --cache-dir/--cache-gib/--max-shards/...`).
CACHE_DIR = "TRAINFLEET_CACHE_DIR"  # shard cache, plans and routers on this worker
CACHE_BYTES = "TRAINFLEET_CACHE_BYTES"  # disk bound of the shard cache
MAX_SHARDS = "TRAINFLEET_MAX_SHARDS"  # memory bound of the shard cache, in shards
VERIFY_ROUTING = "TRAINFLEET_VERIFY_ROUTING"  # "1": re-fit a handed router before using it
ROUTER_FILE = "TRAINFLEET_ROUTER_FILE"  # the router the coordinator handed over, if any
# `trainfleet join --max-mbps N`: the volunteer's link cap (Mbit/s), handed to replica programs
# (which pick their pseudo-gradient codec from it); never part of a run's spec.
MAX_MBPS = "TRAINFLEET_MAX_MBPS"
# A pipeline producer's data plane (`store = "http"`): the address its FeatureServer binds
# (default 127.0.0.1) and the host consumers reach it at (default: the bind host).
FEATURE_HOST = "TRAINFLEET_FEATURE_HOST"
FEATURE_ADVERTISE = "TRAINFLEET_FEATURE_ADVERTISE"

DEFAULT_MAX_SHARDS = 8  # `join --max-shards`: shards kept in memory
DEFAULT_CACHE_GIB = 4.0  # `join --cache-gib`: disk bound of the shard cache
DEFAULT_PORT = 8470
DEFAULT_URL = f"http://127.0.0.1:{DEFAULT_PORT}"
DEFAULT_STATE_DIR = ".trainfleet"
