"""Checking tools with their own folders: the Metal emulator, the checks of what Apple's compilers see, and the differential fuzzer."""
