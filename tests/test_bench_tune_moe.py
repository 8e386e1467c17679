"""The MoE tuner's pipeline on the CPU (``python -m bench.tune_moe --tiny``): it times candidate
tile configurations through the interpreter, checks the winner against the fp64 reference, and
writes a table file that the kernels' lookup reads back."""
import json

from mm1_kernels.moe import tile_configs

from bench import tune_moe


def test_tuner_writes_a_table_the_lookup_uses(tmp_path, monkeypatch, capsys):
    assert tune_moe.main(["--tiny", "--dtypes", "int8", "--out", str(tmp_path)]) == 0
    path = tmp_path / "device_name=cpu-interpreter,dtype=int8.json"
    table = tile_configs.load_table(str(path))
    assert set(table["configs"]) == {32} and table["buckets"] == tile_configs.token_buckets()
    log = json.loads(path.with_suffix(".log.json").read_text())
    assert all(r["rel_err"] <= 1e-2 for r in log if "rel_err" in r) and len(log) >= len(table["buckets"])
    assert "wrote" in capsys.readouterr().out
    # The lookup takes the measured table when pointed at it.
    monkeypatch.setenv("MM1_MOE_CONFIG", str(path))
    for T, cfg in zip((1, 4, 9), table["configs"][32]):
        got = tile_configs.moe_config(32, 32, T)
        assert got["GROUP_M"] == cfg["GROUP_M"] and got["num_stages"] == cfg["num_stages"]
    tile_configs._resolve.cache_clear()


def test_candidates_respect_the_tile_rules():
    base = tile_configs.moe_config(9216, 6144, 4096)
    for T in (1, 64, 65, 4096):
        cands = tune_moe.candidates(T, 9216, 6144, tile_configs.moe_config(9216, 6144, T), 48)
        assert cands[0] == {f: tile_configs.moe_config(9216, 6144, T)[f] for f in tile_configs.FIELDS}
        assert 2 <= len(cands) <= 48 and len({json.dumps(c, sort_keys=True) for c in cands}) == len(cands)
        for c in cands[1:]:
            assert (c["BLOCK_M"] == 16) == (T <= 64)
            assert c["num_warps"] <= max(4, c["BLOCK_M"] // 16)
            assert tile_configs.fit_stages(c["num_stages"], c["BLOCK_M"], c["BLOCK_N1"], c["BLOCK_K1"], 2, 2, 2) \
                == c["num_stages"]
    assert base["BLOCK_M"] == 64
