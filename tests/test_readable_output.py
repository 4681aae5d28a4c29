"""What a newcomer reads (issue 19): our log lines on lines of their own beside mergekit's bars,
did-you-mean for a misspelt method or scorer function, and a search plot that hides nothing."""

from __future__ import annotations

import io
import logging
import re
import sys

import pytest
from click.testing import CliRunner
from conftest import mergekit_yaml_in_process, write_config
from test_merge_graph import expo_config

from mergekit_expo.cli import main


def test_our_log_lines_start_a_line_while_mergekit_draws_its_bar(console_merge):
    """``mergekit-yaml expo.yml OUT -v`` as its own process (the session's ``console_merge``)."""
    stderr = console_merge["stderr"]
    assert console_merge["returncode"] == 0, stderr[-3000:]
    assert "Executing graph" in stderr  # the bar is drawn on the same stream
    ours = [m.start() for m in re.finditer(r"(INFO|WARNING):mergekit_expo:", stderr)]
    assert any("expo roles:" in stderr[i:i + 40] for i in ours)
    glued = [stderr[max(0, i - 60):i + 40] for i in ours if i and stderr[i - 1] not in "\r\n"]
    assert not glued, glued


def test_logging_set_up_by_the_caller_is_left_alone():
    """Only a record that would reach one plain StreamHandler on stderr is written by tqdm."""
    from mergekit_expo.output.console import _plain_stderr_handler

    parent, child = logging.getLogger("i19_caller"), logging.getLogger("i19_caller.expo")
    parent.propagate = False
    try:
        for handlers, expected in (
            ([logging.StreamHandler(sys.stderr)], 0),
            ([logging.StreamHandler(io.StringIO())], None),  # another stream
            ([logging.StreamHandler(sys.stderr), logging.StreamHandler(sys.stderr)], None),
            ([logging.NullHandler()], None),
        ):
            parent.handlers[:] = handlers
            found = _plain_stderr_handler(child)
            assert found is (handlers[expected] if expected is not None else None)
        parent.handlers[:] = [logging.StreamHandler(sys.stderr)]
        child.addHandler(logging.NullHandler())  # the caller's own handler on our logger
        assert _plain_stderr_handler(child) is None
    finally:
        parent.handlers.clear()
        child.handlers.clear()


@pytest.mark.parametrize("typo", ["exp0", "exop", "Expo"])
def test_check_names_a_misspelt_method_and_suggests_expo(zoo, tmp_path, typo):
    config = expo_config(zoo.sft, zoo.dpo, alpha=0.3) | {"merge_method": typo}
    path = write_config(tmp_path / "typo.yml", config)
    result = CliRunner().invoke(main, ["check", str(path)])
    assert result.exit_code == 1
    assert f"merge_method `{typo}` is not a merge method mergekit knows; did you mean `expo`?" \
        in result.output


def test_a_mergekit_method_is_not_taken_for_a_typo(zoo, tmp_path):
    from mergekit_expo.plan.config import misspelt_method

    assert misspelt_method({"merge_method": "linear"}, "x") is None
    assert misspelt_method({"merge_method": "expo"}, "x") is None
    assert "did you mean `expo`" in misspelt_method({"merge_method": "exop"}, "x")


def test_the_search_names_a_misspelt_method(zoo, tmp_path):
    from mergekit_expo.search.merge_config import SearchConfigError, load_search_config

    path = write_config(tmp_path / "typo.yml",
                        expo_config(zoo.sft, zoo.dpo) | {"merge_method": "exp0"})
    with pytest.raises(SearchConfigError, match="did you mean `expo`"):
        load_search_config(path)


def test_mergekit_yaml_refuses_a_misspelt_method_in_one_block(zoo, tmp_path):
    """mergekit's own command (its click callback, wrapped as in the console script)."""
    config = expo_config(zoo.sft, zoo.dpo, alpha=0.3) | {"merge_method": "exp0"}
    done = mergekit_yaml_in_process(write_config(tmp_path / "typo.yml", config), tmp_path / "out")
    assert done.exit_code == 1
    assert "mergekit-yaml: refused by mergekit-expo" in done.stderr
    assert "merge_method `exp0` is not a merge method mergekit knows; did you mean `expo`?" \
        in done.stderr
    assert "Traceback" not in done.output and not (tmp_path / "out").exists()


def test_a_misspelt_scorer_function_gets_a_suggestion(tmp_path):
    from mergekit_expo.search.scorers import ScorerError, load_callable

    source = tmp_path / "score.py"
    source.write_text("def helpful(prompt, response):\n    return 1.0\n")
    with pytest.raises(ScorerError, match=r"has no function 'helpfull'; did you mean 'helpful'\?"):
        load_callable(f"{source}:helpfull")
    with pytest.raises(ScorerError) as refused:
        load_callable(f"{source}:reward")
    assert "did you mean" not in str(refused.value)


def _rows(alphas):
    return [{"alpha": a, "lambda": 0.0, "mean": 1.0 - a / 100, "sem": 0.01,
             "mean_length_tokens": 5.0} for a in alphas]


def test_the_plot_spreads_a_wide_alpha_grid_and_the_winner_hides_no_point():
    from mergekit_expo.search.plot import search_figure

    rows = _rows([0.0, 0.1, 0.3, 1.0, 3.0, 25.0])
    figure = search_figure(rows, winner=rows[0], score_label="reward")
    top, bottom = figure.axes
    assert top.get_xscale() == bottom.get_xscale() == "symlog"
    points = [line for line in top.get_lines() if line.get_marker() == "o"
              and 0.0 in list(line.get_xdata())]
    winner = [line for line in points if line.get_label().startswith("best:")]
    data = [line for line in points if not line.get_label().startswith("best:")]
    assert len(winner) == 1 and data  # the α = 0 point and the winner's mark, both drawn
    ring = winner[0]
    assert ring.get_markerfacecolor() == "none"  # an outline: the point shows through
    assert ring.get_markersize() > max(line.get_markersize() for line in data)
    assert ring.get_zorder() > max(line.get_zorder() for line in data)

    narrow = search_figure(_rows([0.0, 0.3, 0.6, 0.9]), winner=None, score_label="reward")
    assert narrow.axes[0].get_xscale() == "linear"

