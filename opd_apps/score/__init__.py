"""`opd score`: score a file of sequences with a teacher once, into Parquet (the trainer's offline scores).

`command` (the command and its config), `input` (the sequences file's rows), `teacher` (the scorer: a teacher
service or an in-process backend).
"""
