import json, sys
from test_api import *  # noqa

def test_probe(api, running):
    worker, job_id = running
    H = {**worker.auth, "content-type": "application/json"}
    for body in (
        b'{"epoch":1,"lines":["a\\u0000b","\\ud800x","\\udfff"]}',
        b'{"epoch":1,"lines":["\x1b[31mred\x1b[0m"]}',
    ):
        r = api.http.post(f"/v1/jobs/{job_id}/logs", content=body, headers=H)
        print("logs", r.status_code, r.text[:200])
    r = api.http.get(f"/v1/jobs/{job_id}/logs", headers=OP)
    print("read", r.status_code, r.text[:400])
    r = api.http.post(f"/v1/jobs/{job_id}/fail", content=b'{"epoch":1,"error":"\\ud800","retryable":true}', headers=H)
    print("fail", r.status_code, r.text[:200])

def test_probe_complete(api, running):
    worker, job_id = running
    H = {**worker.auth, "content-type": "application/json"}
    r = api.http.post(f"/v1/jobs/{job_id}/complete", content=b'{"epoch":1,"result":{"loss":"\\ud800"}}', headers=H)
    print("complete-surrogate", r.status_code, r.text[:200])
    big = {"epoch": 1, "result": {f"k{i}": "\x1b[2J[bold red]x[/]" * 3 for i in range(100000)}}
    data = json.dumps(big).encode()
    print("size", len(data))
    r = api.http.post(f"/v1/jobs/{job_id}/complete", content=data, headers=H)
    print("complete-big", r.status_code, r.text[:200])

def test_probe_name(api, running):
    worker, job_id = running
    for name in ["..", "a\u202eb", "\x9b31m", "x"*201, "a\\b", "\ud800"]:
        try:
            r = api.upload(worker, job_id, 1, b"abc", name=name)
            print("name", repr(name)[:30], r.status_code, r.text[:150])
        except Exception as e:
            print("name", repr(name)[:30], "EXC", e)
