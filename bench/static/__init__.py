"""The static performance report, no GPU needed (`python -m bench static`): compiled
resources (`resources`), theoretical occupancy (`occupancy`), the SASS instruction mix
(`sass`), bytes moved counted under the interpreter (`traffic`), rooflines (`roofline`),
the rules that say what needs work (`findings`), the report itself (`report`,
`markdown`), and the predictions GPU measurements are set beside (`predictions`)."""
