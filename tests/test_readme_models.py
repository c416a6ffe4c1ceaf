"""README's Models table is library/models/variants.py's VARIANTS, row for row, so the two cannot drift."""

import re

from conftest import ROOT
from library.models.variants import VARIANTS, ModelVariant

START, END = "<!-- models-table:", "<!-- /models-table -->"
NO_INPUT = "none (no guidance input)"


def expected_row(v: ModelVariant) -> list[str]:
    def number(x):
        return NO_INPUT if x is None else f"{x:g}" if float(x) != int(x) else f"{x:.1f}"

    return [f"`{v.name}`", f"`{v.architecture}`", str(v.steps), str(v.preview_steps), number(v.guidance),
            "yes" if v.shift else "no", str(v.t5_max_length), number(v.training_guidance), v.licence]


def readme_rows() -> list[list[str]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(START)
    table = text[start:text.index(END, start)].splitlines()[1:]
    rows = [[c.strip() for c in line.strip().strip("|").split("|")] for line in table if line.startswith("|")]
    assert rows[0][:3] == ["`--model_type`", "ModelSpec architecture", "Steps"] and re.fullmatch(r"[-|]+", table[1])
    return rows[2:]


def test_readme_models_table_equals_the_variants_table():
    assert readme_rows() == [expected_row(v) for v in VARIANTS.values()]


def test_the_check_reads_values_as_written():
    schnell = expected_row(VARIANTS["schnell"])
    assert schnell[2:8] == ["4", "4", NO_INPUT, "no", "256", NO_INPUT] and schnell[-1] == "Apache-2.0"
    assert expected_row(VARIANTS["dev"])[4] == "3.5" and expected_row(VARIANTS["kontext"])[7] == "1.0"


def models_section_commands() -> list[list[str]]:
    """The command lines of the README's Models section (continuation lines joined), split as a shell would."""
    import shlex

    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Models\n")
    section = text[start:text.index("\n## ", start + 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        commands += [shlex.split(line) for line in block.replace("\\\n", " ").splitlines() if line.strip()]
    return commands


def test_models_section_command_lines_parse_and_verify():
    import flux_minimal_inference
    import flux_train_network
    from library.training.arguments import verify_training_args

    commands = models_section_commands()
    assert len(commands) == 6  # inference and LoRA training for dev, Krea and schnell
    for argv in commands:
        if argv[0] == "python":
            assert argv[1] == "flux_minimal_inference.py"
            flux_minimal_inference.setup_parser().parse_args(argv[2:])
        else:
            assert argv[:3] == ["accelerate", "launch", "flux_train_network.py"]
            args = flux_train_network.setup_parser().parse_args(argv[3:])
            verify_training_args(args, flux_train_network.COMMAND_LINE)
    by_model = {a[a.index("--ckpt_path" if "--ckpt_path" in a else "--pretrained_model_name_or_path") + 1]: a
                for a in commands if a[0] == "accelerate"}
    assert by_model["flux1-krea-dev.safetensors"][by_model["flux1-krea-dev.safetensors"].index("--model_type") + 1] \
        == "krea"
    assert "--assistant_lora" in by_model["flux1-schnell.safetensors"]
    assert "--guidance_scale" not in by_model["flux1-schnell.safetensors"]  # no guidance input to feed
