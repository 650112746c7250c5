"""Operator tools: commands that start no component and drive none, but work on what the components read and write.

`queue` (`opd queue`: list dead-lettered prompts and rollouts with reasons; requeue or drop them) and
`prompt_convert` (`opd convert-prompts`: MATH-500 / AIME / DAPO files to opd's prompt schema).
"""
