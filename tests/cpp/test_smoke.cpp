#include <gtest/gtest.h>
#include "qmoe/qmoe.h"
TEST(Smoke, Version) { EXPECT_STREQ(qmoe::version(), "0.1.0"); }
