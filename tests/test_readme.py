"""README.md is generated from nbs/index.ipynb; the stored outputs it is made from must be current too."""
import json

from mnist_k8s.dev import render_readme, settings_table


def test_readme_is_rendered_from_index(repo_root):
    assert (repo_root / "README.md").read_text() == render_readme(repo_root / "nbs" / "index.ipynb")


def test_settings_table_in_index_is_current(repo_root):
    nb = json.loads((repo_root / "nbs" / "index.ipynb").read_text())
    tables = ["".join(o["data"]["text/markdown"]) for c in nb["cells"] if c["cell_type"] == "code"
              for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
    assert settings_table() in tables, "re-run nbs/index.ipynb and `mnist-k8s readme`: the settings changed"


def test_readme_names_every_command(repo_root):
    from mnist_k8s.cli import build_parser
    text = (repo_root / "README.md").read_text()
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    for name in sub.choices:
        assert f"mnist-k8s {name}" in text, name
