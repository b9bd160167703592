// Stand-in (see ../README.md).
#pragma once
typedef struct __IOSurface* IOSurfaceRef;
