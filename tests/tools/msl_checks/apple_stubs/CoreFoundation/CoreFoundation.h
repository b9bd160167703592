// Stand-in (see ../README.md).
#pragma once
typedef double CFTimeInterval;
