"""Per-client results of FML against the same models trained alone: the table and the figures."""

from fedmutual.report.plots import plot_clients
from fedmutual.report.tables import client_rows, client_series

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# two clients, three rounds; round 2 was not evaluated; client 1 has no validation split
FML = [
    {"round": 1, "personal_acc": [0.50, None]},
    {"round": 2, "personal_acc": None},
    {"round": 3, "personal_acc": [0.70, None]},
]
ALONE = [
    {"round": 1, "personal_acc": [0.60, None]},
    {"round": 2, "personal_acc": None},
    {"round": 3, "personal_acc": [0.55, None]},
]


def test_client_series_skips_unevaluated_rounds_and_missing_values():
    assert client_series(FML, "personal_acc", 0) == [0.50, 0.70]
    assert client_series(FML, "personal_acc", 1) == []


def test_client_rows_give_best_final_and_gains_in_points():
    header, rows = client_rows(FML, ALONE, "personal_acc", ["0: mlp", "1: cnn2"])
    assert header == ["client", "FML best", "FML final", "alone best", "alone final", "gain best", "gain final"]
    # best: 70 against 60 -> +10; final: 70 against 55 -> +15
    assert rows[0] == ["0: mlp", "70.00", "70.00", "60.00", "55.00", "+10.00", "+15.00"]
    assert rows[1] == ["1: cnn2", "–", "–", "–", "–", "–", "–"]


def test_plot_clients_writes_both_figure_styles(tmp_path):
    for style in ("best", "curve"):
        path = tmp_path / f"{style}.png"
        plot_clients(FML, ALONE, path, ["0: mlp", "1: cnn2"], style=style, title="t")
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def test_a_groups_task_in_a_cell_does_not_split_the_markdown_row():
    from fedmutual.report.tables import markdown_table

    table = markdown_table(["client", "acc"], [["1: cnn1, groups:0,1|2,3", "90.00"]])
    assert table.splitlines()[2] == "| 1: cnn1, groups:0,1\\|2,3 | 90.00 |"
